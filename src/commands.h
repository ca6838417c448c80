/* commands.h: the entry points of deltamla's subcommands besides train and info. Each
 * takes the arguments after the subcommand name, parses its own flags (--help lists
 * them), ends bad input through die() with one clear line, and returns the exit status.
 * MPI is initialised by main() before and finalised after. */
#ifndef DELTAMLA_COMMANDS_H
#define DELTAMLA_COMMANDS_H

int prep_main(int argc, char **argv);      /* src/prep.c */
int ckpt_main(int argc, char **argv);      /* io/ckpt_tool.c */
int generate_main(int argc, char **argv);  /* src/generate.c */

#endif
