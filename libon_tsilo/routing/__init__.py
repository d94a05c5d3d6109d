"""Where a call to a phone number or another domain goes (issue 13, "Calls out").

- `numbers.py`: the E.164 number a request URI names, and the local user who owns it;
- `trunks.py`: a trunk (targets tried in order, credentials, headers, a concurrency limit);
- `routes.py`: the ordered `[[routes]]` table: number prefix or domain -> trunk;
- `policy.py`: who may call out, to where, how many calls at once; every refusal has a reason.

Below b2bua/ (which places the calls) and above sip/; it knows nothing of calls or push.
"""
