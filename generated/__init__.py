"""The committed modules of the built-in cells, installed as bpttgen.generated
(``bpttgen generate --builtins`` regenerates them)."""
