"""NativeAuthenticator, fitted to JupyterHub 6.

NativeAuthenticator 1.3 predates JupyterHub 6: its login handler still times
itself with ``self.statsd`` (removed from the hub) and its ``_render`` does not
take the ``sync=`` argument the hub now passes when it re-renders the login
page for an error.  Both made a login POST a 500.  These subclasses bridge the
two without touching either package.
"""
from __future__ import annotations

from nativeauthenticator import NativeAuthenticator
from nativeauthenticator.handlers import LoginHandler


class _NullTimer:
    def start(self):
        return self

    def stop(self, *args, **kwargs):
        pass


class _NullStatsd:
    def timer(self, *args, **kwargs):
        return _NullTimer()

    def incr(self, *args, **kwargs):
        pass


class BaiLoginHandler(LoginHandler):
    statsd = _NullStatsd()

    def _render(self, login_error=None, username=None, **kwargs):
        kwargs.pop("sync", None)
        return super()._render(login_error=login_error, username=username)


class BaiNativeAuthenticator(NativeAuthenticator):
    """NativeAuthenticator with a login handler that works on JupyterHub 6."""

    def get_handlers(self, app):
        return [
            (entry[0], BaiLoginHandler if entry[1] is LoginHandler else entry[1], *entry[2:])
            for entry in super().get_handlers(app)
        ]
