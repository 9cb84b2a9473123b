#!/usr/bin/env bash
# Build the pydist images: base (locked deps) first, then the run image FROM it.
# Mirrors the original build_base_images.sh / build_run_images.sh split: the base only
# rebuilds (from cache, usually) when pyproject.toml/uv.lock change.
#
#   docker/build_images.sh            # both
#   docker/build_images.sh base|run   # one of them
#
# BASE_IMAGE (default pydist-base:latest) and RUN_IMAGE (default pydist:latest) override
# the tags; docker-compose.yml uses PYDIST_IMAGE, default pydist:latest.
set -euo pipefail

cd "$(dirname "$0")/.."   # build context = repo root (see .dockerignore)

BASE_IMAGE="${BASE_IMAGE:-pydist-base:latest}"
RUN_IMAGE="${RUN_IMAGE:-pydist:latest}"
what="${1:-all}"

build_base() {
  docker build -f docker/Dockerfile.base -t "$BASE_IMAGE" .
}

build_run() {
  docker build -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$RUN_IMAGE" .
}

case "$what" in
  base) build_base ;;
  run) build_run ;;
  all) build_base && build_run ;;
  *) echo "usage: $0 [base|run|all]" >&2; exit 2 ;;
esac
