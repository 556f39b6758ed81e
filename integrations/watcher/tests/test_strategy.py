"""symbiont's strategies inside Watcher's decision engine: loaded through the ``watcher_strategies``
entry point by Watcher's own loader, run on Watcher's fake cluster scenarios (the XML models its
own tests use), the solution scheduled into an action plan by Watcher's weight planner (in its
test database), and every action checked against the action plugin's own schema.

``SYMBIONT_DAEMONS`` (colon-separated sockets) adds a test against live symbiont host daemons.
Run with scripts/watcher-test.sh (a separate venv with python-watcher).
"""

from __future__ import annotations

import os
from unittest import mock

from oslo_utils import uuidutils
from watcher.applier.loading.default import DefaultActionLoader
from watcher.common import utils
from watcher.decision_engine.loading.default import DefaultStrategyLoader
from watcher.decision_engine.model import element
from watcher.decision_engine.planner import weight
from watcher.decision_engine.strategy import strategies
from watcher.tests.unit.db import base as db_base
from watcher.tests.unit.db import utils as db_utils
from watcher.tests.unit.decision_engine.model import faker_cluster_state, gnocchi_metrics

from symbiont_watcher import core
from symbiont_watcher.model import model_from_inventories
from symbiont_watcher.strategy import SymbiontConsolidation, SymbiontHotspot, snapshot

WEIGHTS = {"turn_host_to_acpi_s3_state": 10, "resize": 20, "migrate": 30, "sleep": 40,
           "change_nova_service_state": 50, "nop": 60}  # fmt: skip


def used(model, node):
    insts = model.get_node_instances(node)
    return sum(i.vcpus for i in insts), sum(i.memory for i in insts)


class StrategyTest(db_base.DbTestCase):
    def setUp(self):
        super().setUp()
        self.fake = faker_cluster_state.FakerModelCollector()
        self.goal = db_utils.create_test_goal(name="server_consolidation")
        self.db_strategy = db_utils.create_test_strategy(name="symbiont_consolidation", goal_id=self.goal.id)
        self.audit = db_utils.create_test_audit(uuid=utils.generate_uuid(), strategy_id=self.db_strategy.id,
                                                goal_id=self.goal.id)  # fmt: skip
        self.planner = weight.WeightPlanner(mock.Mock(weights=WEIGHTS, parallelization={k: 2 for k in WEIGHTS}))

    def run_strategy(self, cls, model, params=None, datasource=None):
        with mock.patch.object(strategies.BaseStrategy, "compute_model", new_callable=mock.PropertyMock) as m, \
                mock.patch.object(strategies.BaseStrategy, "audit_scope", new_callable=mock.PropertyMock), \
                mock.patch.object(cls, "datasource_backend", new_callable=mock.PropertyMock) as ds:  # fmt: skip
            m.return_value = model
            if datasource is None:
                ds.side_effect = RuntimeError("no datasource in this test")
            else:
                ds.return_value = datasource
            s = cls(config=mock.Mock(datasources=None))
            s.input_parameters = utils.Struct(params or {})
            return s, s.execute()

    def schedule(self, solution):
        """Watcher's planner turns the solution into an action plan in its database."""
        plan = self.planner.schedule(self.context, self.audit.id, solution)
        from watcher import objects

        return plan, objects.Action.list(self.context, filters={"action_plan_uuid": plan.uuid})

    def validate(self, action):
        """The applier's own plugin for the action type validates its parameters."""
        plugin = DefaultActionLoader().load(action["action_type"])
        params = dict(action["input_parameters"])
        if not uuidutils.is_uuid_like(params["resource_id"]):
            params["resource_id"] = utils.generate_uuid()  # some fake scenarios name instances INSTANCE_n
        plugin.input_parameters = params
        self.assertTrue(plugin.validate_parameters())

    def test_entry_point_registered(self):
        loader = DefaultStrategyLoader()
        self.assertIs(loader.load("symbiont_consolidation").__class__, SymbiontConsolidation)
        self.assertIs(loader.load("symbiont_hotspot").__class__, SymbiontHotspot)
        self.assertIn("symbiont_consolidation", loader.list_available())

    def test_consolidation_frees_nodes_on_watcher_scenarios(self):
        """Every Watcher fake scenario with enabled nodes: the plan frees nodes without ever
        exceeding a node's capacity, and disables exactly the nodes it empties."""
        checked = 0
        for gen in ("generate_scenario_1", "generate_scenario_3_with_2_nodes", "generate_scenario_6_with_2_nodes",
                    "generate_scenario_7_with_2_nodes", "generate_scenario_8_with_4_nodes",
                    "generate_scenario_9_with_3_active_plus_1_disabled_nodes", "generate_scenario_10"):  # fmt: skip
            model = getattr(self.fake, gen)()
            snap = snapshot(model)
            before = {n.id for n in snap.nodes if n.enabled and any(v.node == n.id for v in snap.vms)}
            s, sol = self.run_strategy(SymbiontConsolidation, model)
            after = {n.uuid for n in model.get_all_compute_nodes().values() if model.get_node_instances(n)}
            disabled = [a["input_parameters"]["resource_id"] for a in sol.actions if a["action_type"] == "change_nova_service_state"]
            self.assertEqual(sorted(before - after), sorted(disabled), gen)
            self.assertEqual(s.migrations, sum(a["action_type"] == "migrate" for a in sol.actions))
            for node in model.get_all_compute_nodes().values():
                cap = {n.id: n.capacity for n in snap.nodes}[node.uuid]
                cpu, mem = used(model, node)
                self.assertLessEqual(cpu, cap["cpu"] + 1e-9, (gen, node.hostname))
                self.assertLessEqual(mem, cap["mem"] + 1e-9, (gen, node.hostname))
            for a in sol.actions:
                self.validate(a)
            checked += len(sol.actions)
        self.assertGreater(checked, 0, "no scenario gave any action: the test would prove nothing")

    def test_consolidation_scenario_1_action_plan(self):
        """Scenario 1 (5 nodes, light instances): nodes are freed, and Watcher's planner schedules
        the disabling of the emptied nodes first (so Nova's scheduler stops picking them), then the
        migrations to explicit destinations, as its default weights say."""
        model = self.fake.generate_scenario_1()
        n_used = sum(1 for n in model.get_all_compute_nodes().values() if model.get_node_instances(n))
        s, sol = self.run_strategy(SymbiontConsolidation, model)
        n_after = sum(1 for n in model.get_all_compute_nodes().values() if model.get_node_instances(n))
        self.assertLess(n_after, n_used)
        self.assertEqual(s.released, n_used - n_after)
        ind = {i["name"]: i["value"] for i in sol.efficacy_indicators}
        self.assertEqual(ind["released_compute_nodes_count"], n_used - n_after)
        plan, actions = self.schedule(sol)
        self.assertEqual(plan.strategy_id, self.db_strategy.id)
        kinds = {a.action_type for a in actions}
        self.assertEqual(kinds, {"migrate", "change_nova_service_state"})
        by_uuid = {a.uuid: a for a in actions}
        first = [a for a in actions if not a.parents]
        self.assertEqual({a.action_type for a in first}, {"change_nova_service_state"})
        for a in actions:  # the planner's graph: every migration waits for a disabling (directly or not)
            if a.action_type == "migrate":
                seen, todo = set(), list(a.parents)
                while todo:
                    p = by_uuid[todo.pop()]
                    seen.add(p.action_type)
                    todo += p.parents
                self.assertIn("change_nova_service_state", seen)

    def test_consolidation_respects_excluded_and_disabled(self):
        model = self.fake.generate_scenario_1_with_all_instances_exclude()
        _s, sol = self.run_strategy(SymbiontConsolidation, model)
        self.assertEqual([a for a in sol.actions if a["action_type"] == "migrate"], [])
        model = self.fake.generate_scenario_9_with_3_active_plus_1_disabled_nodes()
        disabled = {n.hostname for n in model.get_all_compute_nodes().values()
                    if n.status == element.ServiceState.DISABLED.value}  # fmt: skip
        _s, sol = self.run_strategy(SymbiontConsolidation, model)
        for a in sol.actions:
            if a["action_type"] == "migrate":
                self.assertNotIn(a["input_parameters"]["destination_node"], disabled)

    def test_hotspot_with_watcher_datasource(self):
        """Scenario 6 with Watcher's fake Gnocchi metrics (the workload-balance ones): the node over
        the CPU threshold is relieved by a migration to the other node, which stays under it."""
        model = self.fake.generate_scenario_6_with_2_nodes()
        metrics = gnocchi_metrics.FakeGnocchiMetrics()
        ds = mock.Mock(statistic_aggregation=metrics.mock_get_statistics_wb)
        snap = snapshot(model)
        load = {}
        for n in snap.nodes:
            load[n.id] = sum(metrics.mock_get_statistics_wb(resource=model.get_instance_by_uuid(v.id),
                                                            meter_name="instance_cpu_usage") / 100 * v.demand["cpu"]
                             for v in snap.vms if v.node == n.id) / n.capacity["cpu"]  # fmt: skip
        hot = max(load, key=load.get)
        th = (max(load.values()) + min(load.values())) / 2  # between the two nodes: one hotspot
        s, sol = self.run_strategy(SymbiontHotspot, model, {"cpu_threshold": th, "mem_threshold": 1.0}, ds)
        self.assertEqual([h["host"] for h in s.hotspots], [hot])
        migs = [a for a in sol.actions if a["action_type"] == "migrate"]
        self.assertTrue(migs)
        src = model.get_node_by_uuid(hot).hostname
        self.assertTrue(all(a["input_parameters"]["source_node"] == src for a in migs))
        for a in migs:
            self.validate(a)
        goal = db_utils.create_test_goal(name="workload_balancing", id=2, uuid=utils.generate_uuid())
        st = db_utils.create_test_strategy(name="symbiont_hotspot", goal_id=goal.id, id=2, uuid=utils.generate_uuid())
        self.audit = db_utils.create_test_audit(uuid=utils.generate_uuid(), strategy_id=st.id, goal_id=goal.id, id=2,
                                                name="hotspot audit")  # fmt: skip
        plan, actions = self.schedule(sol)
        self.assertEqual(len(actions), len(migs))

    def test_hotspot_below_threshold_does_nothing(self):
        model = self.fake.generate_scenario_6_with_2_nodes()
        ds = mock.Mock(statistic_aggregation=gnocchi_metrics.FakeGnocchiMetrics().mock_get_statistics_wb)
        s, sol = self.run_strategy(SymbiontHotspot, model, {"cpu_threshold": 5.0, "mem_threshold": 5.0}, ds)
        self.assertEqual((s.hotspots, sol.actions), ([], []))

    def test_live_symbiont_daemons(self):
        """A cluster model built from live symbiont host daemons (SYMBIONT_DAEMONS), with their
        sample series as the usage: the VMs' host is a hotspot at a tiny threshold, and the plan
        never moves a VM onto a node where it would itself cross the threshold."""
        daemons = [d for d in os.environ.get("SYMBIONT_DAEMONS", "").split(":") if d]
        if not daemons:
            self.skipTest("SYMBIONT_DAEMONS not set (tests/vm/test_cluster.py sets it on a live lab)")
        invs = core.fetch_inventories(daemons)
        model = model_from_inventories(invs)
        nodes = {n.hostname: n for n in model.get_all_compute_nodes().values()}
        self.assertEqual(sorted(nodes), sorted(i["host"]["id"] for i in invs))
        for inv in invs:
            got = sorted(i.name for i in model.get_node_instances(nodes[inv["host"]["id"]]))
            self.assertEqual(got, sorted(v["id"] for v in inv["host"]["vms"]))
        busy = [inv["host"]["id"] for inv in invs if inv["host"]["vms"]]
        self.assertTrue(busy, "no VM on any live host")
        s, sol = self.run_strategy(SymbiontHotspot, model, {"symbiont_daemons": daemons, "cpu_threshold": 0.0001,
                                                            "mem_threshold": 1.0, "k": 1, "n": 1})  # fmt: skip
        self.assertEqual(sorted(h["host"] for h in s.hotspots), sorted(busy))
        self.assertEqual(sol.actions, [])  # one VM per busy host: moving it only moves the hotspot

