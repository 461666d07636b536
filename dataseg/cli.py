"""absl flags for the command-line tools that are also imported as libraries.

Each such tool defines its flags on its own `FlagValues` (`new_flags()`) and parses them
with `parse`: importing several tools into one process (tests, a notebook) never
redefines a flag, and a call with a list of flags starts from the defaults every time.
`dataseg.main` and `dataseg.plan` are only run as programs and use absl's global FLAGS.
"""

import sys
from typing import Sequence

from absl import flags


def new_flags() -> flags.FlagValues:
  return flags.FlagValues()


def parse(
  flag_values: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str = ""
) -> flags.FlagValues:
  """Parses `argv` (flags only; default sys.argv[1:]) into `flag_values`.

  --help prints `doc` and the flags and exits 0; a bad flag or a stray argument exits 2
  with one line.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv):
    print(f"usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{flag_values.get_help()}")
    sys.exit(0)
  flag_values.unparse_flags()
  try:
    rest = flag_values([prog, *argv])
  except flags.Error as e:
    print(f"{prog}: {e}\nPass --help to see the flags.", file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(
      f"{prog}: unexpected arguments {rest[1:]}\nPass --help to see the flags.", file=sys.stderr
    )
    sys.exit(2)
  return flag_values


def usage_error(prog: str, message: str):
  """Exits 2 with one line, as a bad flag does."""
  print(f"{prog}: {message}\nPass --help to see the flags.", file=sys.stderr)
  sys.exit(2)
