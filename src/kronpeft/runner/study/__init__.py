"""`kronpeft study`: run a grid of `kronpeft train` runs and record one JSON line per finished run.

A grid is a TOML file (see benchmarks/study/*.toml):

    [study]  name, model, results (path of the .jsonl, relative to the grid file), seeds, sweep_seed,
             tasks, extend_edges (add one learning rate beyond a sweep's edge when the edge wins),
             edge_factor (that rate is the edge's times or over this; default the sweep's own ratio),
             notes (a Markdown file the report inserts before its setup section), summary (one it puts
             under the title: the findings in plain words), title (the page's)
    [train]  flags every run shares (epochs, batch_size, max_length, ...), as `kronpeft train` spells them
    [[method]] name (the row label), method (`--method`), family (the line a plot joins), lrs (the sweep),
               optional tasks (a subset) and args (more `kronpeft train` flags)

Stage 1 runs every learning rate of a method's sweep with `sweep_seed`; stage 2 runs the other seeds at
the learning rate that scored best on dev. Each run is `python -m kronpeft train ...` in a subprocess (the
code path users run), with its own output folder; a finished run is appended to the results file under an
exclusive lock, so runners side by side never write the same row twice. Runs already recorded are skipped;
an interrupted run resumes from its checkpoint.
"""
