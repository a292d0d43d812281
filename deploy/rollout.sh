#!/usr/bin/env bash
# Deploy one release of pgpush with an overlay: migrations first, then the rollout.
#
#   deploy/rollout.sh deploy/overlays/prod
#
# 1. the supporting objects (Namespace, ServiceAccount, ConfigMap, NetworkPolicy, the optional monitoring
#    components: no app.kubernetes.io/component label),
#    which the migration Job needs;
# 2. the migration Job (component=migrate): the previous release's Job is deleted first (a Job's pod template is
#    immutable), then this one runs `pgpush migrate` to completion; a failure stops the script before any pod of
#    the new release starts;
# 3. everything that serves (component=server): Service, Deployment, HPA, PDB, Ingress; then waits for the rollout.
#
# Environment: KUBECTL (default kubectl, which must include kustomize: kubectl ≥ 1.14), KUBECTL_CONTEXT,
# MIGRATE_TIMEOUT_SECONDS (default 900, as the Job's activeDeadlineSeconds), ROLLOUT_TIMEOUT (default 10m),
# SKIP_MIGRATIONS=1 for a rollback to an older release (its code does not know the newer schema revision, and
# migrations are backward compatible, so the old release runs on the newer schema: README.md, "Roll back").
set -euo pipefail

overlay="${1:?usage: deploy/rollout.sh deploy/overlays/<environment>}"
kubectl=("${KUBECTL:-kubectl}")
if [ -n "${KUBECTL_CONTEXT:-}" ]; then
    kubectl+=(--context "$KUBECTL_CONTEXT")
fi
migrate_timeout="${MIGRATE_TIMEOUT_SECONDS:-900}"
rollout_timeout="${ROLLOUT_TIMEOUT:-10m}"

namespace="$(sed -n 's/^namespace:[[:space:]]*//p' "$overlay/kustomization.yaml" | tr -d "\"'")"
if [ -z "$namespace" ]; then
    echo "rollout.sh: $overlay/kustomization.yaml sets no namespace" >&2
    exit 2
fi
k() { "${kubectl[@]}" --namespace "$namespace" "$@"; }

echo "==> [$namespace] supporting objects"
k apply -k "$overlay" --selector 'app.kubernetes.io/component notin (server,migrate)'

if [ "${SKIP_MIGRATIONS:-0}" = "1" ]; then
    echo "==> [$namespace] migration Job skipped (SKIP_MIGRATIONS=1)"
else
    echo "==> [$namespace] migration Job"
    k delete job pgpush-migrate --ignore-not-found --wait=true
    k apply -k "$overlay" --selector 'app.kubernetes.io/component=migrate'
    deadline=$((SECONDS + migrate_timeout))
    while :; do
        succeeded="$(k get job pgpush-migrate -o jsonpath='{.status.succeeded}')"
        failed="$(k get job pgpush-migrate -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')"
        if [ "${succeeded:-0}" -ge 1 ]; then
            break
        fi
        if [ "$failed" = "True" ] || [ "$SECONDS" -ge "$deadline" ]; then
            echo "rollout.sh: the migration Job did not complete; nothing of the new release was rolled out" >&2
            k logs job/pgpush-migrate --all-containers --tail=200 >&2 || true
            exit 1
        fi
        sleep 5
    done
    k logs job/pgpush-migrate --all-containers --tail=50 || true
fi

echo "==> [$namespace] server"
k apply -k "$overlay" --selector 'app.kubernetes.io/component=server'
k rollout status deployment/pgpush --timeout="$rollout_timeout"
