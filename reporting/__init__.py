"""The run report: a self-contained HTML page about one output location.

`reporting.run` reads the location (summary, tables, sampled items),
`reporting.images` re-reads sampled items' source images through the
pipeline's own decode functions and draws the detection boxes, and
`reporting.html` renders the page. `pipelines.report` is the command.
"""
