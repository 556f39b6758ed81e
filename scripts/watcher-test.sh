#!/bin/sh
# Test the OpenStack Watcher strategies (integrations/watcher) inside Watcher's decision engine.
# python-watcher (and its OpenStack dependencies) lives in its own venv, build/venv-watcher, made
# once (about 1.5 min with a PyPI mirror) and reused; symbiont's own code comes from this checkout.
# Extra arguments go to pytest; SYMBIONT_DAEMONS=sock1:sock2 adds the live-daemon test.
set -eu
cd "$(dirname "$0")/.."
VENV=${SYMBIONT_WATCHER_VENV:-build/venv-watcher}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import watcher, fixtures, oslotest, webtest, symbiont_watcher" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "python-watcher>=13" fixtures oslotest testtools webtest pytest numpy pyyaml httpx psutil
  "$VENV/bin/pip" install -q --no-deps -e integrations/watcher
fi
# symbiont (placement library) from this checkout, without its host-daemon dependencies
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD/daemon" > "$SITE/symbiont-checkout.pth"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider integrations/watcher/tests "$@"
