# deltamla build.
#   make            bin/deltamla (CPU backend; CUDA kernels too when nvcc is found)
#   make test       every CPU test (the README's test command)
#   make install PREFIX=/opt/deltamla/0.1.0   the binary, job scripts, modulefiles, docs
#   make clean
# MPI, CUDA, NCCL and HDF5 are found through their compiler wrappers, pkg-config or
# *_HOME variables (MPI: mpicc on PATH or MPICC=; CUDA: nvcc on PATH or CUDA_HOME;
# HDF5: pkg-config hdf5-openmpi or HDF5_HOME; NCCL: NCCL_HOME or the CUDA include path;
# cuDNN's attention: the cuDNN frontend's headers and cuDNN, see below).

CFLAGS_BASE := -std=c11 -O2 -g -Wall -Wextra -Wno-unused-parameter -fopenmp -MMD -MP
LDLIBS := -lm -fopenmp

# ---- MPI ----
MPICC ?= $(shell command -v mpicc 2>/dev/null)
ifneq ($(MPICC),)
  CC := $(MPICC)
  HAVE_MPI := yes
  CFLAGS_BASE += -DDELTAMLA_HAVE_MPI
else
  CC := cc
  HAVE_MPI := no
endif

# ---- CUDA ----
NVCC ?= $(shell command -v nvcc 2>/dev/null || { test -n "$(CUDA_HOME)" && test -x "$(CUDA_HOME)/bin/nvcc" && echo "$(CUDA_HOME)/bin/nvcc"; })
CU_SRCS := $(wildcard kernels/*.cu)
ifneq ($(NVCC),)
  HAVE_CUDA := yes
  CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
  # sm_90a: Hopper (H100/H200) with its architecture-specific instructions (wgmma)
  NVCCFLAGS := -O3 -g -lineinfo -std=c++20 -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC -MMD -MP \
               -DDELTAMLA_HAVE_CUDA
  CFLAGS_BASE += -DDELTAMLA_HAVE_CUDA
  LDLIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublas -lcublasLt -lcudart -lstdc++
else
  HAVE_CUDA := no
endif

# ---- NCCL (the CUDA build's collectives; without it they go through MPI on host copies) ----
NCCL_INC := $(firstword $(wildcard $(NCCL_HOME)/include/nccl.h $(CUDA_HOME)/include/nccl.h /usr/include/nccl.h))
HAVE_NCCL := $(if $(and $(NCCL_INC),$(filter yes,$(HAVE_CUDA))),yes,no)
ifeq ($(HAVE_NCCL),yes)
  NCCL_DIR := $(patsubst %/include/nccl.h,%,$(NCCL_INC))
  NVCCFLAGS += -DDELTAMLA_HAVE_NCCL -I$(NCCL_DIR)/include
  CFLAGS_BASE += -DDELTAMLA_HAVE_NCCL
  LDLIBS += $(foreach d,$(wildcard $(NCCL_DIR)/lib $(NCCL_DIR)/lib64),-L$(d)) -lnccl
else
  CU_SRCS := $(filter-out kernels/nccl.cu,$(CU_SRCS))
endif

# ---- cuDNN (fused attention through the cuDNN frontend's headers: pip install
# nvidia-cudnn-frontend, or CUDNN_FRONTEND_INC=dir holding cudnn_frontend.h; cuDNN itself
# in the CUDA toolkit, the system, or CUDNN_HOME) ----
CUDNN_FRONTEND_INC ?= $(shell python3 -c 'import sysconfig, os; d = os.path.join(sysconfig.get_paths()["purelib"], "include"); print(d if os.path.exists(os.path.join(d, "cudnn_frontend.h")) else "")' 2>/dev/null)
CUDNN_H := $(firstword $(wildcard $(CUDNN_HOME)/include/cudnn.h $(CUDA_HOME)/include/cudnn.h /usr/include/cudnn.h \
                                   /usr/include/x86_64-linux-gnu/cudnn.h))
HAVE_CUDNN := $(if $(and $(filter yes,$(HAVE_CUDA)),$(CUDNN_FRONTEND_INC),$(CUDNN_H)),yes,no)
ifeq ($(HAVE_CUDNN),yes)
  NVCCFLAGS += -DDELTAMLA_HAVE_CUDNN
  CFLAGS_BASE += -DDELTAMLA_HAVE_CUDNN
  CPP_SRCS := kernels/attention_cudnn.cpp
  CUDNN_DIR := $(patsubst %/include/cudnn.h,%,$(CUDNN_H))
  LDLIBS += $(foreach d,$(wildcard $(CUDNN_DIR)/lib $(CUDNN_DIR)/lib64),-L$(d) -Wl,-rpath,$(d)) -lcudnn -lnvrtc
endif

# ---- HDF5 (parallel) ----
HDF5_PC := $(shell pkg-config --exists hdf5-openmpi 2>/dev/null && echo hdf5-openmpi)
ifneq ($(HDF5_HOME),)
  HAVE_HDF5 := $(if $(wildcard $(HDF5_HOME)/include/hdf5.h),yes,no)
  HDF5_CFLAGS := -I$(HDF5_HOME)/include
  HDF5_LIBS := -L$(HDF5_HOME)/lib -Wl,-rpath,$(HDF5_HOME)/lib -lhdf5
else
  HAVE_HDF5 := $(if $(HDF5_PC),yes,no)
  HDF5_CFLAGS := $(shell pkg-config --cflags-only-I hdf5-openmpi 2>/dev/null)
  HDF5_LIBS := $(shell pkg-config --libs-only-L hdf5-openmpi 2>/dev/null) -lhdf5
endif
ifneq ($(HAVE_HDF5),yes)
  $(error parallel HDF5 not found: install libhdf5-openmpi-dev (Debian/Ubuntu) or set HDF5_HOME to a parallel HDF5 built with this MPI)
endif
ifneq ($(HAVE_MPI),yes)
  $(error mpicc not found: install libopenmpi-dev (Debian/Ubuntu) or set MPICC; deltamla is an MPI program)
endif
CFLAGS_BASE += $(HDF5_CFLAGS)
LDLIBS += $(HDF5_LIBS)

CFLAGS := $(CFLAGS_BASE) $(CFLAGS_EXTRA)

LIB_SRCS := $(filter-out src/main.c,$(wildcard src/*.c src/cpu/*.c io/*.c))
LIB_OBJS := $(patsubst %.c,build/obj/%.o,$(LIB_SRCS))
CU_OBJS := $(if $(filter yes,$(HAVE_CUDA)),$(patsubst %.cu,build/obj/%.o,$(CU_SRCS)) $(patsubst %.cpp,build/obj/%.o,$(CPP_SRCS)))
DBL_OBJS := $(patsubst %.c,build/dbl/%.o,$(wildcard src/cpu/*.c)) build/dbl/tests/ops/gradcheck.o

OPS_TESTS := $(patsubst tests/ops/%.c,build/tests/%,$(filter-out tests/ops/gradcheck.c,$(wildcard tests/ops/*.c)))
LIB_TESTS := $(patsubst tests/%.c,build/tests/%,$(wildcard tests/test_*.c))

.PHONY: all test clean found tests-build gpu-tests-build gpu-test bench install
.SECONDARY:
all: found bin/deltamla

found:
	@echo "deltamla build: MPI=$(HAVE_MPI)$(if $(filter yes,$(HAVE_MPI)), ($(MPICC)))  CUDA=$(HAVE_CUDA)$(if $(filter yes,$(HAVE_CUDA)), ($(NVCC)))  NCCL=$(HAVE_NCCL)  cuDNN=$(HAVE_CUDNN)  HDF5=$(HAVE_HDF5)"

build/libdeltamla.a: $(LIB_OBJS) $(CU_OBJS)
	@mkdir -p $(@D)
	rm -f $@ && ar rcs $@ $^

bin/deltamla: build/obj/src/main.o build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)
	@echo "built $@ (backends: cpu$(if $(filter yes,$(HAVE_CUDA)), + compiled kernels/))"

build/obj/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -c $< -o $@

build/obj/%.o: %.cu
	@mkdir -p $(@D)
	$(NVCC) $(NVCCFLAGS) -Isrc -Ikernels -c $< -o $@

# host C++ over the cuDNN frontend's headers (warnings off: they are the headers')
build/obj/%.o: %.cpp
	@mkdir -p $(@D)
	$(CXX) -std=c++17 -O2 -g -fPIC -MMD -MP -w -DDELTAMLA_HAVE_CUDA -DDELTAMLA_HAVE_CUDNN -I$(CUDNN_DIR)/include \
	    -I$(CUDA_HOME)/include -I$(CUDNN_FRONTEND_INC) -Isrc -Ikernels -c $< -o $@

build/dbl/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -DCPU_REAL_DOUBLE -Isrc -Isrc/cpu -Itests/ops -c $< -o $@

build/tests/%: tests/ops/%.c $(DBL_OBJS)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -DCPU_REAL_DOUBLE -Isrc -Isrc/cpu -Itests/ops -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

build/tests/%: tests/%.c build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

TOOLS := $(patsubst tests/tools/%.c,build/tests/%,$(wildcard tests/tools/*.c))

build/tests/%: tests/tools/%.c build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

tests-build: bin/deltamla $(OPS_TESTS) $(LIB_TESTS) $(TOOLS)

test: found tests-build
	bash tests/run_tests.sh

# GPU tests: built wherever nvcc is, run on a machine with a GPU (skip without one)
GPU_TESTS := $(if $(filter yes,$(HAVE_CUDA)),$(patsubst tests/gpu/%.c,build/gpu_tests/%,$(wildcard tests/gpu/test_gpu_*.c)))

build/gpu_tests/%: tests/gpu/%.c tests/gpu/gpu_test.c build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -Itests/gpu -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

gpu-tests-build: bin/deltamla $(GPU_TESTS) build/bench/bench_step build/bench/bench_alltoall build/bench/bench_mixers

# benchmarks
build/bench/bench_step: benchmarks/bench_step.c benchmarks/timed_backend.c benchmarks/op_costs.c benchmarks/ceilings.c build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -Ibenchmarks -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

build/bench/bench_mixers: benchmarks/bench_mixers.c benchmarks/timed_backend.c benchmarks/op_costs.c benchmarks/ceilings.c build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -Ibenchmarks -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

build/bench/bench_alltoall: benchmarks/bench_alltoall.c build/libdeltamla.a
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -Isrc -o $@ $(filter %.c %.o %.a,$^) $(LDLIBS)

bench: build/bench/bench_step build/bench/bench_alltoall build/bench/bench_mixers

gpu-test: found gpu-tests-build
	bash tests/gpu/run_gpu_tests.sh

# ---- install ----
# PREFIX/bin/deltamla, PREFIX/share/deltamla/{jobscripts,doc}, and the modulefiles
# PREFIX/modulefiles/deltamla/VERSION.lua (Lmod) and VERSION (Tcl) with PREFIX, VERSION and
# the prerequisite module names written in. The names default to the MPI, CUDA and HDF5
# modules loaded while make runs (LOADEDMODULES), else openmpi, cuda (CUDA builds only) and
# hdf5; MODULE_MPI=, MODULE_CUDA=, MODULE_HDF5= set them. DESTDIR stages the tree elsewhere.
VERSION := $(shell sed -n 's/^\#define DELTAMLA_VERSION "\(.*\)"/\1/p' src/version.h)
PREFIX ?= /usr/local
loaded_module = $(shell printf '%s\n' "$$LOADEDMODULES" | tr ':' '\n' | grep -i -- '$(1)' | grep -vi -- '$(2)' | head -n 1)
MODULE_MPI ?= $(or $(call loaded_module,mpi,hdf5),openmpi)
MODULE_HDF5 ?= $(or $(call loaded_module,hdf5,^$$),hdf5)
MODULE_CUDA ?= $(if $(filter yes,$(HAVE_CUDA)),$(or $(call loaded_module,cuda,^$$),cuda))
JOBSCRIPTS := $(wildcard jobscripts/*.sbatch) jobscripts/train.sh jobscripts/plot_scaling.py
modulefile_subst = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' -e 's|@MODULE_MPI@|$(MODULE_MPI)|g' \
	-e 's|@MODULE_CUDA@|$(MODULE_CUDA)|g' -e 's|@MODULE_HDF5@|$(MODULE_HDF5)|g'

install: all
	@test -n "$(VERSION)" || { echo "make install: no DELTAMLA_VERSION in src/version.h"; exit 1; }
	@case "$(PREFIX)" in /*) ;; *) echo "make install: PREFIX must be an absolute path (got '$(PREFIX)')"; exit 1;; esac
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/deltamla/jobscripts \
		$(DESTDIR)$(PREFIX)/share/deltamla/doc/io $(DESTDIR)$(PREFIX)/modulefiles/deltamla
	install -m 755 bin/deltamla $(DESTDIR)$(PREFIX)/bin/deltamla
	install -m 755 $(JOBSCRIPTS) $(DESTDIR)$(PREFIX)/share/deltamla/jobscripts/
	install -m 644 jobscripts/lib.sh jobscripts/README.md $(DESTDIR)$(PREFIX)/share/deltamla/jobscripts/
	install -m 644 README.md $(DESTDIR)$(PREFIX)/share/deltamla/doc/
	install -m 644 io/*.md $(DESTDIR)$(PREFIX)/share/deltamla/doc/io/
	$(modulefile_subst) modulefiles/deltamla/deltamla.lua.in >$(DESTDIR)$(PREFIX)/modulefiles/deltamla/$(VERSION).lua
	$(modulefile_subst) modulefiles/deltamla/deltamla.tcl.in >$(DESTDIR)$(PREFIX)/modulefiles/deltamla/$(VERSION)
	chmod 644 $(DESTDIR)$(PREFIX)/modulefiles/deltamla/$(VERSION).lua $(DESTDIR)$(PREFIX)/modulefiles/deltamla/$(VERSION)
	@echo "installed deltamla $(VERSION) in $(PREFIX); the modulefiles load, where this site has them:" \
		"$(or $(MODULE_MPI),-) $(or $(MODULE_CUDA),-) $(or $(MODULE_HDF5),-)"
	@echo "use it: module use $(PREFIX)/modulefiles && module load deltamla"

clean:
	rm -rf build bin

-include $(shell find build -name '*.d' 2>/dev/null)
