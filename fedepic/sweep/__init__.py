"""Experiment grids: one command runs every cell of ``sweep:`` (seeds x attacks x defenses x any key),
each an ordinary run folder, and aggregates them into mean +- standard error tables and figures.

- ``plan``: the axes, the cells (each a validated RunConfig) and the sweep folder's key;
- ``cells``: one cell's run, and moving its folder into the sweep folder;
- ``run``: the sweep folder from its start to every end (statuses, resume, the sequential executor);
- ``aggregate``: the numbers (mean, standard error, n over seeds; best member per row);
- ``report``: the tables and figures written from those numbers.

The parallel executor uses Ray, so it lives in ``simulations/sweep_ray.py`` (the core never imports
flwr or ray).
"""
