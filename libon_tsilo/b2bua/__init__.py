"""The B2BUA call layer: a call = the caller's A-leg + one B-leg per device branch.

Modules, one job each:
- manager.py  CallManager: entry points for the transaction user, the call/dialog/flow tables.
- call.py     Call: forking, parking, waking, answering, cleanup.
- states.py   one class per call state (Parked, Forking, Connected, Ended): one method per event.
- legs.py     ALeg (UAS side) and BLeg (one device branch); dialog.py: RFC 3261 §12 dialog state.
- forking.py  RFC 3261 §16.7 response choice (pure).
- capabilities.py  the Allow and Supported the B2BUA states on each leg (its own, never copied).
- relay.py    in-dialog relaying after the answer (BYE, re-INVITE/UPDATE + glare, INFO/MESSAGE/OPTIONS).
- session_timer.py  RFC 4028 session timers on both legs, and [calls] max_call_duration.
- ports.py    SipPort: what calls need from sip/ (TransactionPort adapts the real layer).
- waker.py    the Waker protocol (push/ implements it) and LoggingWaker.

Wiring (ops/):
    port = TransactionPort(transaction_layer, clock)
    silo = Silo(clock, location_store, max_pending_per_aor=cfg.calls.max_pending_per_aor)
    location_store.subscribe(silo)                      # late forking on binding events
    mgr = CallManager(clock, port, silo, location_store, waker,
                      CallSettings.from_config(cfg.calls, use_domain=cfg.registrar.use_domain),
                      authorize=authorizer_from_policy(auth_policy), is_local=...)
    router.route("INVITE", mgr.handle_invite); router.in_dialog = mgr.handle_in_dialog
    router.ack = mgr.handle_ack; router.cancel = mgr.handle_cancel  (4th arg: the CANCEL's stx)
    router.stray = mgr.stray_response; flow_table.subscribe_close(mgr.flow_closed)
"""
