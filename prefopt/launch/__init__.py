"""Running prefopt on a Ray cluster: `prefopt submit` and `prefopt job ...` (docs/cluster.md).

`submit.py` talks to the cluster's dashboard through Ray's Job Submission SDK and builds what a job
needs (the resolved config, the code, the tracking environment); `cli.py` holds the commands. Ray is
imported inside functions only, so that `prefopt --help` stays fast.
"""

# A job's files (a sweep file and its configs), base64 of JSON {relative path: text}: written by
# submit.py, unpacked on the cluster by job_entry.py (which imports nothing but the standard library).
FILES_ENV = "PREFOPT_JOB_FILES"
