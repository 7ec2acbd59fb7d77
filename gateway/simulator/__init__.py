"""A TokenHub stand-in for the demo, the tests and the benchmarks (`python -m gateway.simulator`).

    app     the Starlette app: tasks, result files, the `/_sim` control API
    tasks   a simulated task: its timeline and record
    faults  the faults a test can script: errors, delays, cut answers
    media   signed result URLs and the bytes of the videos and covers

May import: policy and the shared nouns.
"""
