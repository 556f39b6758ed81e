"""Clones restored from one saved template (lab/clone.py) on real libvirt/QEMU: each agent
answers on its own channel, each clone writes to its own overlay, removal leaves nothing.

The template (one boot of the golden image, settled and saved) is cached under
``lab.cache_dir/clones`` like the golden image: only the first run pays for its boot."""

from __future__ import annotations

import secrets
from pathlib import Path

import libvirt
import pytest

from symbiont.config import load_config
from symbiont.host.libvirt_host import LibvirtHost
from symbiont_research.lab import vms
from symbiont_research.lab.clone import build_template, remove_clone, restore_clone
from symbiont_research.lab.console import guest_exec
from symbiont_research.lab.image import build_image, make_recipe

pytestmark = [pytest.mark.root, pytest.mark.libvirt, pytest.mark.vm]


@pytest.fixture(scope="module")
def env(libvirtd):
    base = load_config(None)
    run = secrets.token_hex(3)
    cfg = load_config(None, {"lab": {"vm_prefix": f"{base.lab.vm_prefix}clonetest-{run}-", "max_vcpus": 1}})
    image = build_image(Path(base.lab.images_dir), Path(base.lab.cache_dir), make_recipe(base.lab.mirror))
    host = LibvirtHost(base.libvirt_uri)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    tpl = build_template(host, cfg, image, 512)
    yield host, cfg, tpl, vms.LabOwner.new_run(run)
    host.close()


def test_three_clones_answer_write_their_own_disks_and_leave_nothing(env) -> None:
    host, cfg, tpl, owner = env
    names = [f"{cfg.lab.vm_prefix}{i}" for i in range(1, 4)]
    disk_before = (tpl.disk.stat().st_size, tpl.disk.stat().st_mtime)
    clones = []
    try:
        for n in names:
            clones.append(restore_clone(host, cfg, tpl, n, owner))
        uuids = {host.domain(n).UUIDString() for n in names}
        assert len(uuids) == 3
        for c in clones:
            assert host.domain(c.vm.name).isActive()
            assert host.channel_path(c.vm.name, cfg.agent.channel_name) == str(c.vm.channel)
            hello = vms.wait_for_agent(c.vm.channel, timeout=60)
            assert hello["version"] == tpl.info()["agent_version"]
            assert vms.domain_mark(host.domain(c.vm.name)).owner.run == owner.run
        token = secrets.token_hex(8)
        before = clones[0].vm.overlay.stat().st_size
        r = guest_exec(host, names[0], f"head -c 4M /dev/urandom > /root/clone-mark && echo {token} >> /root/clone-mark"
                                       " && sync && tail -c 17 /root/clone-mark", timeout=60)
        assert r.rc == 0 and token in r.output
        assert clones[0].vm.overlay.stat().st_size >= before + (4 << 20)  # clone 1's own overlay holds it
        r = guest_exec(host, names[1], "test -e /root/clone-mark; echo present=$?", timeout=60)
        assert "present=1" in r.output  # clone 1's file is not in clone 2
        assert (tpl.disk.stat().st_size, tpl.disk.stat().st_mtime) == disk_before  # template disk untouched
    finally:
        for n in names:
            remove_clone(host, cfg, n, owner)
    for c in clones:
        assert not host.exists(c.vm.name)
        assert not c.vm.dir.exists()
        assert not c.vm.channel.exists() and not c.vm.gpu_channel.exists()
    assert tpl.ready()  # the template stays cached for the next clones
