#!/usr/bin/env bash
# Build and push the worker image (TPU or GPU) and the flex template launcher image of one launch profile.
#
#   launch/build_image.sh --profile tpu-v6e-1 --project PROJECT --region REGION [--repository vision-batch] [--local]
#
# Default: Cloud Build (launch/cloudbuild.yaml), no local Docker engine needed. --local builds with
# the local Docker engine and pushes (needs `gcloud auth configure-docker REGION-docker.pkg.dev`).
# Tags come from setup.py's version: bump it before pushing changed code, or the tag is overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="" project="" region="" repository="vision-batch" local_build=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --region) region="$2"; shift 2 ;;
    --repository) repository="$2"; shift 2 ;;
    --local) local_build=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$profile" || -z "$project" || -z "$region" ]]; then
  echo "usage: $0 --profile PROFILE --project PROJECT --region REGION [--repository NAME] [--local]" >&2
  exit 2
fi

registry="${region}-docker.pkg.dev/${project}/${repository}"
image() { python3 -m launch.image --profile "$profile" --registry "$registry" "$@"; }

if [[ "$local_build" == 1 ]]; then
  worker="$(image worker-image)" launcher="$(image launcher-image)"
  worker_args=() launcher_args=()  # read line by line: macOS ships bash 3, without mapfile
  while IFS= read -r arg; do worker_args+=("$arg"); done < <(image build-args)
  while IFS= read -r arg; do launcher_args+=("$arg"); done < <(image launcher-build-args)
  DOCKER_BUILDKIT=1 docker build --file launch/Dockerfile --tag "$worker" "${worker_args[@]}" .
  DOCKER_BUILDKIT=1 docker build --file launch/flex_template/Dockerfile --tag "$launcher" "${launcher_args[@]}" .
  docker push "$worker"
  docker push "$launcher"
else
  gcloud builds submit --project "$project" --region "$region" \
    --config launch/cloudbuild.yaml --substitutions "$(image substitutions)" .
fi
