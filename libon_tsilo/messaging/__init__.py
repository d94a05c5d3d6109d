"""Instant messages to sleeping phones: SIP MESSAGE store-and-forward (RFC 3428).

A sibling of silo/: both wait for a device to come back, one with a call, one with messages.
``store.py`` (the MessageStore seam, memory), ``sqlite_store.py`` (the durable default),
``outbox.py`` (the messages waiting per user, expiry), ``accept.py`` (the MESSAGE a user sends:
checks, limits, 202 once stored), ``delivery.py`` (to every device of the user: at once when it is
reachable, after a push and its REGISTER when it sleeps), ``uac.py`` (the MESSAGE we send).
Imports registrar/ and sip/ only; push reaches it through the duck-typed ``MessageNotifier``.
"""
