"""Pick the push sender for a device: its pn-provider names the service, its pn-param the app.

- ``apns``: pn-param is ``<Team ID>.<bundle id>[.voip]`` (RFC 8599 §9.1); the sender is the
  ``[[push.apns]]`` app with that bundle id (one APNsSender per app).
- ``fcm``: pn-param is the Firebase project id; the sender is the ``[[push.fcm]]`` project with it.
  A device that sent no pn-param is accepted when exactly one project is configured.
- anything else: a ``[[push.webhook]]`` whose name is the pn-provider; pn-param is passed along.

Senders are duck-typed (IPushSender plus ``bundle_id`` / ``project_id``), so tests can use fakes.
``replace()`` swaps the whole set at once (SIGHUP credential reload).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["PushRouter", "apns_bundle", "app_key", "build_senders"]


def apns_bundle(pn_param: str | None) -> str | None:
    """The bundle id of an APNs pn-param ("TEAMID.com.example.app.voip" -> "com.example.app")."""
    if not pn_param:
        return None
    team, dot, topic = pn_param.strip().partition(".")
    if not dot or not team or not topic:
        return None
    bundle = topic.removesuffix(".voip")
    if not bundle or bundle.startswith(".") or bundle.endswith("."):
        return None
    return bundle


def app_key(sender: Any) -> tuple[str, str]:
    """(provider, app) under which a sender is found."""
    provider = str(sender.provider)
    if provider == "apns":
        return provider, str(sender.bundle_id)
    if provider == "fcm":
        return provider, str(sender.project_id)
    return provider, ""


class PushRouter:
    def __init__(self, senders: Iterable[Any] = ()) -> None:
        self._senders: dict[tuple[str, str], Any] = {}
        self._by_provider: dict[str, list[Any]] = {}
        self.replace(senders)

    @property
    def senders(self) -> list[Any]:
        return list(self._senders.values())

    @property
    def providers(self) -> list[str]:
        return sorted(self._by_provider)

    def replace(self, senders: Iterable[Any]) -> list[Any]:
        """Use ``senders`` from now on; returns the previous ones (the caller closes them).

        Two senders for the same app: the first one wins (config order), as ops validates names.
        """
        table: dict[tuple[str, str], Any] = {}
        by_provider: dict[str, list[Any]] = {}
        for sender in senders:
            key = app_key(sender)
            if key in table:
                continue
            table[key] = sender
            by_provider.setdefault(key[0], []).append(sender)
        old = list(self._senders.values())
        self._senders, self._by_provider = table, by_provider
        return old

    def route(self, provider: str | None, pn_param: str | None) -> tuple[Any | None, str]:
        """(sender, "") or (None, why): why is a stable text, fit for a once-only config error log."""
        if not provider:
            return None, "binding has no pn-provider"
        candidates = self._by_provider.get(provider)
        if not candidates:
            return None, f"no push sender configured for pn-provider {provider!r}"
        if provider == "apns":
            bundle = apns_bundle(pn_param)
            if bundle is None:
                return None, f"apns pn-param {pn_param!r} is not <TeamID>.<bundle id>[.voip]"
            sender = self._senders.get(("apns", bundle))
            if sender is None:
                return None, f"no [[push.apns]] app for bundle id {bundle!r}"
            return sender, ""
        if provider == "fcm":
            if not pn_param:
                if len(candidates) == 1:
                    return candidates[0], ""
                return None, "fcm binding without pn-param (project id) and several projects configured"
            sender = self._senders.get(("fcm", pn_param.strip()))
            if sender is None:
                return None, f"no [[push.fcm]] project {pn_param.strip()!r}"
            return sender, ""
        return candidates[0], ""


def build_senders(
    push: Any, clock: Any, fcm_pool: Any = None, reactor: Any = None
) -> tuple[list[Any], list[str]]:
    """Senders for the providers listed in ``[push] providers`` (ops' PushConfig, read duck-typed).

    Returns (senders, errors): an app whose credentials cannot be loaded is left out and described
    in ``errors`` (one line each, naming the config table), so the caller logs it once, loudly,
    instead of every call failing with a traceback.
    """
    enabled = set(push.providers)
    senders: list[Any] = []
    errors: list[str] = []
    if "apns" in enabled:
        from libon_tsilo.push.apns import APNsSender

        for i, app in enumerate(push.apns):
            try:
                sender = APNsSender(app, clock)
                if sender.token is not None:
                    sender.token.get_header()  # a bad .p8 key fails here, not on the first call
            except Exception as e:
                errors.append(f"push.apns[{i}] ({app.bundle_id}): {type(e).__name__}: {e}")
                continue
            senders.append(sender)
    if "fcm" in enabled:
        from libon_tsilo.push.fcm import FCMSender

        if fcm_pool is None:
            errors.append("push.fcm: no thread pool for FCM")
        else:
            for i, app in enumerate(push.fcm):
                try:
                    _check_service_account(app.service_account_file)
                    senders.append(FCMSender(app, clock, fcm_pool, reactor=reactor))
                except Exception as e:
                    errors.append(f"push.fcm[{i}] ({app.project_id}): {type(e).__name__}: {e}")
    hooks = [h for h in push.webhook if h.name in enabled]
    if hooks:
        from libon_tsilo.push.webhook import WebhookSender

        for i, hook in enumerate(hooks):
            try:
                senders.append(WebhookSender(hook.name, hook.url, hook.timeout, clock, reactor=reactor))
            except Exception as e:
                errors.append(f"push.webhook[{i}] ({hook.name}): {type(e).__name__}: {e}")
    return senders, errors


def _check_service_account(path: str) -> None:
    """Read the service-account JSON now (pyfcm reads it lazily, in a pool thread, per call)."""
    import json

    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    missing = [k for k in ("client_email", "private_key", "token_uri") if not data.get(k)]
    if missing:
        raise ValueError(f"service account file {path} lacks {', '.join(missing)}")
