"""What mvllmd (the daemon), mvllmctl (the CLI) and mvllm-sim (the simulator) share: each of them
imports this package, and this package none of them.

    mvllm.v1         the gRPC API: the generated stubs of protos/mvllm/v1/*.proto
    mvllm.jobs       the job model: JobSpec, Sampling, Sample, JobRecord, and `validate`
    mvllm.convert    the job model to and from the API's messages
    mvllm.addresses  where mvllmd listens by default, and where clients look for it
    mvllm.httpd      a small HTTP/1.1 server on httptools (the simulator's, and the daemon's to come)

`mvllm.jobs` and `mvllm.addresses` use the standard library only.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mvllm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# Every response of mvllmd carries its version in this initial-metadata key, so a client can warn
# when its own differs without asking.
VERSION_METADATA_KEY = "mvllm-version"
