"""The application: the ``bpttgen`` command (cli.py), its tour (demo.py) and the
training tasks it offers (tasks.py). It may import everything else of bpttgen;
nothing imports it."""
