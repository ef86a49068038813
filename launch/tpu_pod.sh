#!/usr/bin/env bash
# Run one command on every host of a Cloud TPU VM slice (multi-host JAX), collect the logs, tear down.
#
#   launch/tpu_pod.sh --name mgjax-34b --zone us-east5-a --type v5p-128 [--version v2-alpha-tpuv5] \
#       [--spot] [--keep] [--reuse] [--restarts N] -- mgjax check-cluster
#
# Steps: create the slice (or reuse one with --reuse), copy this repository (git archive of HEAD) to
# every host, install it with TPU JAX, run the command on all hosts at once (`gcloud ... ssh
# --worker=all`; MGJAX_JOIN=1 makes every mgjax command join the job, and JAX finds the other hosts by
# itself), copy each host's log to ./logs/NAME/, and delete the slice unless --keep.
# --restarts N: run the command again on every host after a failed run, up to N times, each restart logged
# (a lost host ends the others with exit 1; `mgjax train` resumes from its last checkpoint); a bad input
# (exit 2) or an interrupt (130, 143) is not retried.
set -euo pipefail

NAME="" ZONE="" TYPE="" VERSION="v2-alpha-tpuv5" SPOT="" KEEP=0 REUSE=0 PROJECT_FLAG="" RESTARTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT_FLAG="--project=$2"; shift 2 ;;
    --spot) SPOT="--spot"; shift ;;
    --keep) KEEP=1; shift ;;
    --reuse) REUSE=1; shift ;;
    --restarts) RESTARTS="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument $1 (see the header of this file)" >&2; exit 2 ;;
  esac
done
if [[ -z "$NAME" || -z "$ZONE" || -z "$TYPE" || $# -eq 0 || ! "$RESTARTS" =~ ^[0-9]+$ ]]; then
  echo "usage: tpu_pod.sh --name NAME --zone ZONE --type TYPE [--version V] [--spot] [--keep] [--reuse]" \
       "[--restarts N] -- COMMAND..." >&2
  exit 2
fi
CMD="$*"
TPU=(gcloud compute tpus tpu-vm)
ALL=(--zone="$ZONE" $PROJECT_FLAG)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
LOGS="logs/$NAME"

cleanup() {
  if [[ $KEEP -eq 0 ]]; then
    echo "deleting $NAME"
    "${TPU[@]}" delete "$NAME" "${ALL[@]}" --quiet || true
  fi
}

if [[ $REUSE -eq 1 ]] && "${TPU[@]}" describe "$NAME" "${ALL[@]}" >/dev/null 2>&1; then
  echo "reusing $NAME"
else
  echo "creating $NAME ($TYPE)"
  "${TPU[@]}" create "$NAME" "${ALL[@]}" --accelerator-type="$TYPE" --version="$VERSION" $SPOT
fi
trap cleanup EXIT

tarball="$(mktemp -d)/mgjax.tar.gz"
git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
"${TPU[@]}" scp "$tarball" "$NAME":~/mgjax.tar.gz "${ALL[@]}" --worker=all
"${TPU[@]}" ssh "$NAME" "${ALL[@]}" --worker=all --command="
  set -e; rm -rf ~/mgjax && mkdir -p ~/mgjax ~/mgjax-logs && tar xzf ~/mgjax.tar.gz -C ~/mgjax
  cd ~/mgjax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q --upgrade pip && pip install -q -e '.[tpu]'"

# Every host runs the same command; each appends to its own log.
mkdir -p "$LOGS"
for ((run = 0; ; run++)); do
  status=0
  "${TPU[@]}" ssh "$NAME" "${ALL[@]}" --worker=all --command="
    cd ~/mgjax && . .venv/bin/activate && export MGJAX_JOIN=1 && ($CMD) >> ~/mgjax-logs/\$(hostname).log 2>&1" \
    || status=$?
  if [[ $status -eq 0 || $status -eq 2 || $status -eq 130 || $status -eq 143 || $run -ge $RESTARTS ]]; then
    break
  fi
  echo "$(date -u +%FT%TZ) exit status $status: restart $((run + 1)) of $RESTARTS" | tee -a "$LOGS/restarts.log" >&2
done
"${TPU[@]}" scp "$NAME":~/mgjax-logs/* "$LOGS"/ "${ALL[@]}" --worker=all || true
echo "logs in $LOGS (exit status $status)"
exit $status
