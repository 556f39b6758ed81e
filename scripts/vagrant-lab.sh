#!/usr/bin/env bash
# The Vagrant lab, with vagrant-libvirt's private-range management network confined to a
# network namespace (never the root namespace):
#
#   netns-up     create netns symb-vg-ns and start a *separate* libvirtd + virtlogd in it, in a
#                private mount namespace whose /etc/libvirt, /run/libvirt, /var/lib/libvirt,
#                /var/cache/libvirt and /var/log/libvirt are folders under $BASE/libvirt, so it
#                never collides with the host's own libvirtd. Its socket, $BASE/libvirt/run/
#                libvirt-sock, is a file: reachable from the root namespace (virsh, symbiontd).
#   box          build the box from the golden image recipe (vagrant/build_box.py) and add it
#   up [N]       vagrant up N VMs (symb-vg-1..N) inside the namespace (SYMBIONT_VMS, default 1)
#   vagrant ...  any vagrant command, run inside the namespace with the lab's environment
#   destroy      vagrant destroy -f
#   netns-down   destroy the lab's domains, stop what netns-up started (by pid), delete the netns
#   env          print the environment (LIBVIRT socket, URI, VAGRANT_HOME) for other tools
#
# Run as root. Every path and name derives from the prefix symb-vg-, so nothing else is touched.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NS="${SYMBIONT_VG_NETNS:-symb-vg-ns}"
BASE="${SYMBIONT_VG_BASE:-/var/lib/symbiont/vagrant}"
LV="$BASE/libvirt"
export SYMBIONT_LIBVIRT_SOCKET="$LV/run/libvirt-sock"
export SYMBIONT_LIBVIRT_URI="qemu:///system?socket=$SYMBIONT_LIBVIRT_SOCKET"
export VAGRANT_HOME="$BASE/home"
export VAGRANT_DOTFILE_PATH="$BASE/dotfile"
export VAGRANT_CWD="$ROOT/vagrant"
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CHECKPOINT_DISABLE=1
export VAGRANT_BOX_UPDATE_CHECK_DISABLE=1
BOX_NAME="symbiont/bookworm"

die() { echo "vagrant-lab: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (it creates a network namespace and runs libvirtd)"

# A pid file names a live process that is still the program it was written for (a stale file
# after a reboot must never make us signal some unrelated process that reused the pid).
alive() {
  [ -f "$1" ] || return 1
  local pid; pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in libvirtd|virtlogd|dnsmasq) return 0 ;; *) return 1 ;; esac
}
in_ns() { ip netns exec "$NS" "$@"; }
virsh_lab() { virsh -q -c "$SYMBIONT_LIBVIRT_URI" "$@"; }

netns_up() {
  ip netns list | grep -qw "^$NS" || ip netns add "$NS"
  ip -n "$NS" link set lo up
  if alive "$LV/libvirtd.pid" && [ -S "$SYMBIONT_LIBVIRT_SOCKET" ]; then
    echo "==> libvirtd in $NS: already running (pid $(cat "$LV/libvirtd.pid"))"; return
  fi
  mkdir -p "$LV"/{run,lib,cache,log} "$VAGRANT_HOME" "$BASE/console"
  chmod 755 "$BASE" "$VAGRANT_HOME"
  chown libvirt-qemu:kvm "$BASE/console" 2>/dev/null || true; chmod 770 "$BASE/console"
  if [ ! -f "$LV/etc/libvirtd.conf" ]; then
    # A private copy of the host's libvirt configuration without any of its domains,
    # networks, pools or autostart links (those belong to the host's libvirtd).
    rm -rf "$LV/etc.tmp"; cp -a /etc/libvirt "$LV/etc.tmp"
    find "$LV/etc.tmp/qemu" "$LV/etc.tmp/storage" -name '*.xml' -delete 2>/dev/null || true
    find "$LV/etc.tmp" -path '*autostart*' -type l -delete 2>/dev/null || true
    mv "$LV/etc.tmp" "$LV/etc"
  fi
  rm -f "$SYMBIONT_LIBVIRT_SOCKET"
  # ip netns exec gives its own mount namespace; unshare makes it private so the bind
  # mounts below stay inside (the daemons keep that namespace alive).
  in_ns unshare --mount --propagation private bash -c "
    set -e
    mount --bind '$LV/etc' /etc/libvirt
    mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
    mount --bind '$LV/run' /run/libvirt
    mount --bind '$LV/lib' /var/lib/libvirt
    mount --bind '$LV/cache' /var/cache/libvirt
    mount --bind '$LV/log' /var/log/libvirt
    virtlogd -d -p '$LV/virtlogd.pid'
    libvirtd -d -p '$LV/libvirtd.pid'
  "
  for _ in $(seq 1 300); do
    [ -S "$SYMBIONT_LIBVIRT_SOCKET" ] && virsh_lab version >/dev/null 2>&1 && break
    sleep 0.2
  done
  [ -S "$SYMBIONT_LIBVIRT_SOCKET" ] || die "libvirtd in $NS did not create $SYMBIONT_LIBVIRT_SOCKET (see $LV/log)"
  echo "==> libvirtd in $NS: started (pid $(cat "$LV/libvirtd.pid")), socket $SYMBIONT_LIBVIRT_SOCKET"
}

netns_down() {
  if alive "$LV/libvirtd.pid"; then
    for dom in $(virsh_lab list --all --name 2>/dev/null | grep '^symb-vg-' || true); do
      virsh_lab destroy "$dom" >/dev/null 2>&1 || true
      virsh_lab undefine "$dom" --remove-all-storage >/dev/null 2>&1 \
        || virsh_lab undefine "$dom" >/dev/null 2>&1 || true
    done
    for net in $(virsh_lab net-list --all --name 2>/dev/null || true); do
      virsh_lab net-destroy "$net" >/dev/null 2>&1 || true
    done
  fi
  # Stop exactly the processes netns-up started (and the dnsmasq its networks started).
  for pidfile in "$LV/libvirtd.pid" "$LV/virtlogd.pid" "$LV"/run/network/*.pid; do
    [ -f "$pidfile" ] || continue
    if alive "$pidfile"; then
      pid="$(cat "$pidfile")"; kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$pidfile"
  done
  rm -rf "$VAGRANT_DOTFILE_PATH"
  if ip netns list | grep -qw "^$NS"; then ip netns del "$NS"; fi
  echo "==> $NS removed"
}

add_box() {
  mkdir -p "$BASE/boxes"
  box="$("$ROOT/.venv/bin/python" "$ROOT/vagrant/build_box.py" "$BASE/boxes")"
  stamp="$VAGRANT_HOME/.symbiont-box"
  if [ "$(cat "$stamp" 2>/dev/null)" = "$(basename "$box")" ] && vagrant box list | grep -q "^$BOX_NAME "; then
    echo "==> box $BOX_NAME: up to date ($(basename "$box"))"; return
  fi
  vagrant box add --force --name "$BOX_NAME" "$box"
  echo "$(basename "$box")" > "$stamp"
  # The old box's base volume in the lab's pool is stale now; drop it unless a lab VM uses it.
  if alive "$LV/libvirtd.pid" && [ -z "$(virsh_lab list --all --name | grep '^symb-vg-' || true)" ]; then
    for vol in $(virsh_lab vol-list default 2>/dev/null | awk '{print $1}' \
                 | grep '^symbiont-VAGRANTSLASH-bookworm_vagrant_box_image' || true); do
      virsh_lab vol-delete --pool default "$vol" >/dev/null || true
    done
  fi
}

cmd="${1:-}"; [ $# -gt 0 ] && shift
case "$cmd" in
  netns-up) netns_up ;;
  netns-down) netns_down ;;
  box) add_box ;;
  up) [ $# -gt 0 ] && export SYMBIONT_VMS="$1"
      netns_up; add_box; in_ns vagrant up --provider=libvirt ;;
  destroy) in_ns vagrant destroy -f ;;
  vagrant) in_ns vagrant "$@" ;;
  env) env | grep -E '^(SYMBIONT_|VAGRANT_)' | sort ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
