"""Running prefopt on a Ray cluster: `prefopt submit` and `prefopt job ...` (docs/cluster.md).

`submit.py` talks to the cluster's dashboard through Ray's Job Submission SDK and builds what a job
needs (the resolved config, the code, the tracking environment); `cli.py` holds the commands. Ray is
imported inside functions only, so that `prefopt --help` stays fast.
"""
