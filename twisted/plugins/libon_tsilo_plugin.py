"""twistd plugin: `twistd -n libon-tsilo --config etc/libon-tsilo.toml`.

Kept tiny on purpose: Twisted imports every plugin module when it scans for plugins, so this file
must not import the server (nor the reactor); the work happens in libon_tsilo.ops.tap.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class LibonTsiloServiceMaker:
    tapname = "libon-tsilo"
    description = "Push-aware SIP server: parks INVITEs, wakes devices via APNs/FCM, late-forks on REGISTER."

    @property
    def options(self) -> type:
        from libon_tsilo.ops.tap import Options

        return Options

    def makeService(self, options: Any) -> Any:
        from libon_tsilo.ops.tap import makeService

        return makeService(options)


serviceMaker = LibonTsiloServiceMaker()
