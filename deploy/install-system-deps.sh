#!/usr/bin/env bash
# Install the real DICOM peers the node is tested against, from Debian's packages:
#   dcmtk        storescu / echoscu / storescp (called by full path under /usr/bin)
#   orthanc      a real PACS, with its DICOMweb plugin
#   dicom3tools  dciodvfy, the validator for the objects we write
#   chromium     a real browser (with chromium-driver) for the worklist page tests
#   postgresql   the server binaries (initdb, postgres), for the private throw-away server the
#                tests start when nothing answers on 127.0.0.1:5432 (tests/postgres_server.py);
#                installed without a cluster of its own, and no service is started
# Does nothing when they are all present. Needs root (or sudo) to install.
set -euo pipefail

need=()
[ -x /usr/bin/storescu ] && [ -x /usr/bin/echoscu ] && [ -x /usr/bin/storescp ] || need+=(dcmtk)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
[ -x /usr/bin/dciodvfy ] || need+=(dicom3tools)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# Where tests/postgres_server.py looks: Debian's /usr/lib/postgresql/<version>/bin, or PATH.
pg_tool() { compgen -G "/usr/lib/postgresql/*/bin/$1" >/dev/null || command -v "$1" >/dev/null; }
{ pg_tool initdb && pg_tool postgres; } || need+=(postgresql)

# --- tools for tests/test_deploy.py: the deploy/ files are checked offline -----------------
#   docker-compose     Debian's Compose v1 validates deploy/compose.yaml (`docker-compose config`);
#                      skipped when the `docker compose` plugin is there, which the test prefers
#   kubernetes-client  kubectl, for `kubectl kustomize deploy/k8s` (any kubectl will do)
#   systemd            systemd-analyze, for `systemd-analyze verify` of deploy/systemd/*.service
{ command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; } \
  || need+=(docker-compose)
command -v kubectl >/dev/null || need+=(kubernetes-client)
command -v systemd-analyze >/dev/null || need+=(systemd)
# --- end of the deploy tools --------------------------------------------------------------

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null; then
  sudo=(sudo)
else
  echo "missing system packages: ${need[*]}" >&2
  echo "install them as root: apt-get install ${need[*]}" >&2
  exit 1
fi

echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# policy-rc.d keeps the packages' own services (Orthanc on port 4242, redis) from starting:
# the tests start their own instances on loopback.
# Both that and the createcluster.d snippet below are removed again on exit.
cleanup=()
trap 'if [ ${#cleanup[@]} -gt 0 ]; then "${sudo[@]}" rm -f "${cleanup[@]}"; fi' EXIT
if [ ! -e /usr/sbin/policy-rc.d ]; then
  cleanup+=(/usr/sbin/policy-rc.d)
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee /usr/sbin/policy-rc.d >/dev/null
  "${sudo[@]}" chmod +x /usr/sbin/policy-rc.d
fi
# Debian's postgresql would otherwise create a system-wide cluster (15/main, on port 5432,
# started at boot); the tests want only the binaries. postgresql-common's createcluster.conf
# reads createcluster.d/ when the package's postinst decides whether to create one.
snippet=/etc/postgresql-common/createcluster.d/pacs-ai-no-main-cluster.conf
if [[ " ${need[*]} " == *" postgresql "* ]] && [ ! -e "$snippet" ]; then
  cleanup+=("$snippet")
  "${sudo[@]}" mkdir -p "$(dirname "$snippet")"
  printf 'create_main_cluster = false\n' | "${sudo[@]}" tee "$snippet" >/dev/null
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
