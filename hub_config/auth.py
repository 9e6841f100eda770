"""NativeAuthenticator, fitted to JupyterHub 6 and made safe against cross-site requests.

NativeAuthenticator 1.3 predates JupyterHub 6: its login handler still times
itself with ``self.statsd`` (removed from the hub) and its ``_render`` does not
take the ``sync=`` argument the hub now passes when it re-renders the login
page for an error.  Both made a login POST a 500.  Its admin actions (approve or
unapprove a sign-up, discard one) act on a plain GET, which a link or redirect on
any site can make a logged-in admin's browser send: here they act only on a POST,
which the hub checks for the admin's xsrf token (templates/authorization-area.html
posts them).  These subclasses bridge the two without touching either package.
"""
from __future__ import annotations

from nativeauthenticator import NativeAuthenticator
from nativeauthenticator.handlers import DiscardHandler, LoginHandler, ToggleAuthorizationHandler


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


class PostOnly:
    """An admin action of NativeAuthenticator's (its ``get``) done on POST only; a GET shows the
    authorization area and changes nothing."""

    async def get(self, name):
        self.redirect(self.hub.base_url + "authorize")

    async def post(self, name):
        return await super().get(name)  # (its admin:users check included)


class BaiToggleAuthorizationHandler(PostOnly, ToggleAuthorizationHandler):
    pass


class BaiDiscardHandler(PostOnly, DiscardHandler):
    pass


OURS = {LoginHandler: BaiLoginHandler, ToggleAuthorizationHandler: BaiToggleAuthorizationHandler,
        DiscardHandler: BaiDiscardHandler}


class BaiNativeAuthenticator(NativeAuthenticator):
    """NativeAuthenticator with a login handler that works on JupyterHub 6 and admin actions
    that need a POST."""

    def get_handlers(self, app):
        return [(entry[0], OURS.get(entry[1], entry[1]), *entry[2:]) for entry in super().get_handlers(app)]
