"""mvllm's gRPC API. `mvllm.v1` holds the generated stubs of protos/mvllm/v1/*.proto."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mvllm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

# Every response of mvllmd carries its version in this initial-metadata key, so a client can warn
# when its own differs without asking.
VERSION_METADATA_KEY = "mvllm-version"
