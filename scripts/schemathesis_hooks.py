# schemathesis hooks of scripts/contracts (loaded through SCHEMATHESIS_HOOKS).
import schemathesis

# Chunks and hot-page bundles are zstd frames: opaque bytes, sent like application/octet-stream
# (schemathesis has no serializer of its own for application/zstd).
schemathesis.serializer.alias("application/zstd", "application/octet-stream")
