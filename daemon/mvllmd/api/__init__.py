"""The gRPC layer. It only translates: proto messages in, domain calls, proto messages out."""
