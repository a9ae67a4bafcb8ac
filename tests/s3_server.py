"""An S3-compatible server on 127.0.0.1 for the tests: moto's, in a process of its own.

A process of its own (not a thread of the test process) so that Ray workers, job drivers and
CLI subprocesses reach it as they would reach a real store, over HTTP, and so that it keeps
answering while the test process waits on them. Every client finds it through the environment,
as pyarrow reads it (AWS_ENDPOINT_URL and test credentials): see `env`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from prefopt.cluster.worker_group import free_port


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server (pyarrow, boto3 and the AWS CLI all read these)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def bucket(self, name: str) -> str:
        """Create bucket `name` (pyarrow only creates buckets when told to). -> "s3://name"."""
        from pyarrow import fs

        s3 = fs.S3FileSystem(endpoint_override=self.endpoint, access_key="testing", secret_key="testing",
                             region="us-east-1", allow_bucket_creation=True)
        s3.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def start(timeout_s: float = 60) -> S3Server:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return S3Server(f"http://127.0.0.1:{port}", process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the S3 test server did not start (exit {process.poll()})") from None
            time.sleep(0.2)


def use(server: S3Server) -> dict[str, str]:
    """Point this process at `server` (os.environ); -> the previous values, for `restore`."""
    previous = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    return previous


def restore(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
