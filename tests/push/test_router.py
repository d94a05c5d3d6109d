"""PushRouter: pn-provider + pn-param -> the sender of that app."""

from __future__ import annotations

from types import SimpleNamespace

from libon_tsilo.push.router import PushRouter, apns_bundle


def apns(bundle: str) -> SimpleNamespace:
    return SimpleNamespace(provider="apns", bundle_id=bundle)


def fcm(project: str) -> SimpleNamespace:
    return SimpleNamespace(provider="fcm", project_id=project)


def hook(name: str) -> SimpleNamespace:
    return SimpleNamespace(provider=name)


def test_apns_bundle_of_pn_param() -> None:
    assert apns_bundle("ABCDE12345.com.example.app.voip") == "com.example.app"
    assert apns_bundle("ABCDE12345.com.example.app") == "com.example.app"
    assert apns_bundle("ABCDE12345") is None
    assert apns_bundle("ABCDE12345..voip") is None
    assert apns_bundle(".com.example") is None
    assert apns_bundle(None) is None and apns_bundle("") is None


def test_apns_selects_the_app_by_bundle_id() -> None:
    a, b = apns("com.example.a"), apns("com.example.b")
    router = PushRouter([a, b])
    assert router.route("apns", "TEAM123456.com.example.b.voip") == (b, "")
    assert router.route("apns", "TEAM123456.com.example.a") == (a, "")
    sender, why = router.route("apns", "TEAM123456.com.other.voip")
    assert sender is None and "com.other" in why
    sender, why = router.route("apns", "garbage")
    assert sender is None and "pn-param" in why


def test_fcm_selects_the_project_and_tolerates_a_missing_param_with_one_project() -> None:
    p1 = fcm("proj-1")
    router = PushRouter([p1])
    assert router.route("fcm", "proj-1") == (p1, "")
    assert router.route("fcm", None) == (p1, "")
    assert router.route("fcm", "proj-2")[0] is None
    p2 = fcm("proj-2")
    router = PushRouter([p1, p2])
    assert router.route("fcm", "proj-2") == (p2, "")
    sender, why = router.route("fcm", None)
    assert sender is None and "several" in why


def test_webhook_by_name_and_unknown_providers() -> None:
    h = hook("relay")
    router = PushRouter([h, apns("com.example.a")])
    assert router.route("relay", "anything") == (h, "")
    assert router.route("relay", None) == (h, "")
    sender, why = router.route("webpush", "x")
    assert sender is None and "webpush" in why
    assert router.route(None, None)[0] is None
    assert router.providers == ["apns", "relay"]


def test_replace_swaps_all_senders_and_returns_the_old_ones() -> None:
    old_a = apns("com.example.a")
    router = PushRouter([old_a, apns("com.example.a")])  # a duplicate app: the first one wins
    assert router.senders == [old_a]
    new_a = apns("com.example.a")
    assert router.replace([new_a, fcm("p")]) == [old_a]
    assert router.route("apns", "T.com.example.a.voip") == (new_a, "")
    assert router.route("fcm", "p")[0] is not None
