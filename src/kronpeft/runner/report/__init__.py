"""`kronpeft report`: render a study's results page (Markdown + plots) from its results file alone.

Per task and method, the learning rate is the sweep's best on dev (seed `sweep_seed`); the cell is the
mean ± sample standard deviation over every recorded seed at that rate (×100, as the papers print them),
with the seed count when it is short of the grid's. Trainable counts exclude the task head.
"""
