"""The policy table and its evaluator: pure, no broker, no store."""

from __future__ import annotations

import pytest

from tidings.bus.names import agent_token
from tidings.errors import ConfigError
from tidings.policy import Budget, Denied, Policy, Rules, to_nats, window


def orders() -> Rules:
    policy = Policy()
    policy.agent("billing", tools=["card.*"], budget=Budget(tool_calls_per_minute=3))
    policy.entity(
        "order",
        key="data.order_id",
        states={"order.placed": "placed", "order.paid": "paid", "order.shipped": "shipped",
                "order.cancelled": "cancelled"},
        transitions={"placed": ["paid", "cancelled"], "paid": ["shipped", "cancelled"]},
    )  # fmt: skip
    policy.publisher("storefront", publishes=["order.placed"])
    return policy.resolve({"billing": ["payment.>", "order.paid"], "free": None})


def test_emits_from_the_agent_declaration_are_the_policy_row() -> None:
    rules = orders()
    assert rules.emit("billing", "payment.charged.eur") is None
    assert rules.emit("billing", "order.paid") is None
    denied = rules.emit("billing", "order.shipped")
    assert isinstance(denied, Denied) and denied.rule == "emits:billing"
    assert "emits=" in denied.reason and "order.shipped" in denied.reason
    assert rules.emit("free", "anything.at.all") is None  # no emits=: anything
    assert rules.emit("unknown", "x") is None


def test_emits_declared_twice_is_refused() -> None:
    policy = Policy().agent("a", emits=["x.y"])
    with pytest.raises(ConfigError, match="keep one"):
        policy.resolve({"a": ["x.z"]})
    assert policy.resolve({"a": None}).emit("a", "x.z") is not None


def test_tools_an_agent_may_call() -> None:
    rules = orders()
    assert rules.tool("billing", "card.charge") is None
    denied = rules.tool("billing", "mail.send")
    assert denied is not None and denied.rule == "tools:billing"
    assert rules.tool("free", "mail.send") is None


def test_transitions_follow_the_table_and_nothing_else() -> None:
    (order,) = orders().moved_by("order.paid")
    assert order.decide(None, "order.placed") == "placed"
    assert order.decide("placed", "order.paid") == "paid"
    assert order.decide("paid", "order.shipped") == "shipped"
    for current, event_type in [
        ("shipped", "order.paid"), (None, "order.paid"), ("placed", "order.shipped"),
        ("shipped", "order.cancelled"), ("cancelled", "order.placed"), ("paid", "order.paid"),
    ]:  # fmt: skip
        denied = order.decide(current, event_type)
        assert isinstance(denied, Denied), (current, event_type)
        assert denied.rule == "transitions:order"
    assert "from 'shipped' it may move to nothing" in str(order.decide("shipped", "order.paid"))
    assert orders().moved_by("payment.charged") == ()


def test_entity_declarations_that_cannot_work_are_refused() -> None:
    states = {"a.one": "one", "a.two": "two"}
    with pytest.raises(ConfigError, match="not one of the states"):
        Policy().entity("a", key="data.id", states=states, transitions={"one": ["three"]})
    with pytest.raises(ConfigError, match="start="):
        Policy().entity("a", key="data.id", states=states,
                        transitions={"one": ["two"], "two": ["one"]})  # fmt: skip
    with pytest.raises(ConfigError, match="dotted path"):
        Policy().entity("a", key="id", states=states, transitions={})
    policy = Policy().entity("a", key="data.id", states=states, transitions={"one": ["two"]})
    with pytest.raises(ConfigError, match="both move on"):
        policy.entity("b", key="data.id", states={"a.one": "x"}, transitions={})


def test_publishers_by_token_scope() -> None:
    rules = orders()
    assert rules.publish({"publish", "storefront"}, "order.placed") is None
    denied = rules.publish({"publish"}, "order.placed")
    assert denied is not None and denied.rule == "publishers" and "storefront" in str(denied)
    assert rules.publish({"storefront"}, "order.paid") is not None
    assert rules.publish({"admin"}, "order.paid") is None
    assert Rules().publish({"publish"}, "order.paid") is None  # none declared: as before


def test_budget_windows_are_fixed_on_the_clock() -> None:
    assert window("tool_calls_per_minute", 120.5) == (120, 59.5)
    assert window("llm_tokens_per_hour", 7200.0 + 1.0) == (7200, 3599.0)
    assert Budget(llm_cost_per_hour=2.5).limits() == {"llm_cost_per_hour": 2.5}
    with pytest.raises(ConfigError):
        Budget(over="drop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Budget(tool_calls_per_minute=-1)


def test_the_table_as_json_and_as_nats_permissions() -> None:
    rules = orders()
    table = rules.as_dict()
    assert table["agents"][0]["agent"] == "billing"
    assert table["agents"][0]["budget"] == {"tool_calls_per_minute": 3.0, "over": "hold"}
    assert table["entities"][0]["start"] == ["placed"]
    conf = to_nats(rules, "shop", {"billing": ["order.placed"], "free": ["x.>"]})
    assert '"shop.events.payment.>"' in conf and '"shop.events.tool.invoke.card.*"' in conf
    assert '"shop.events.order.shipped"' not in conf
    free = conf.split('user: "free"')[1]
    assert '"shop.events.>"' in free


def test_a_budget_in_the_wrong_unit_names_the_field_and_its_unit() -> None:
    for bad in ({"tool_calls_per_minute": "30/min"}, {"tool_calls_per_minute": 2.5},
                {"llm_tokens_per_hour": True}, {"llm_cost_per_hour": "$2"}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"number per (minute|hour), e\.g\."):
            Budget(**bad)  # type: ignore[arg-type]
    assert Budget(llm_cost_per_hour=2.5, tool_calls_per_minute=30.0).limits()


def test_an_entity_move_given_as_one_state_and_a_bad_key() -> None:
    policy = Policy().entity(
        "order", key="data.order_id", states={"order.placed": "placed", "order.paid": "paid"},
        transitions={"placed": "paid"},
    )  # fmt: skip
    entity = policy.resolve({}).entities[0]
    assert entity.transitions == {"placed": ("paid",)}
    for key in ("subjectfoo", "data."):
        with pytest.raises(ConfigError, match="use a dotted path"):
            Policy().entity("o", key=key, states={"o.placed": "placed"}, transitions={})


def test_the_nats_permissions_of_a_partitioned_stream() -> None:
    rules = orders()
    plain = to_nats(rules, "shop", {"billing": ["order.placed"]})
    assert "shop.events.*." not in plain and "LEASES" not in plain
    conf = to_nats(rules, "shop", {"billing": ["order.placed"]}, partitioned=True)
    # <ns>.events.<p>.<type>, <ns>.retry.<agent>.<p>, deliver.<agent>.p<N>.<member>
    assert '"shop.events.*.payment.>"' in conf and '"shop.events.*.order.paid"' in conf
    assert '"shop.events.*.tool.invoke.card.*"' in conf
    assert '"shop.events.payment.>"' not in conf
    assert '"shop.retry.billing.*"' in conf and '"$KV.SHOP_LEASES.>"' in conf
    assert '"_tidings.shop.deliver.billing.>"' in conf
    # The worker's own runtime consumers: tool replies, a workflow's mailbox, approvals.
    conf = to_nats(rules, "shop", {"billing": ["order.placed"]}, app="shop")
    for consumer in ("billing:replies", "billing:mailbox", "shop:approvals"):
        assert f'"_tidings.shop.deliver.{agent_token(consumer)}"' in conf
