"""Snapshots over HTTP: the REST API and the admin panel (``{prefix}admin/snapshots``).

The work (naming, the commit, the jobs) is ``bai_scheduler.snapshots``; its
``Snapshots`` manager is ``self.settings["snapshots"]``.

REST API (all JSON; admins only unless said otherwise; others get 403):

* ``POST   {prefix}api/snapshots`` ``{"user", "server", "tag"}`` → 202 ``{"job": …}``
* ``GET    {prefix}api/snapshots`` → ``{"jobs", "images", "sessions", "errors"}``
* ``GET    {prefix}api/snapshots/{job}`` → ``{"job": …}``
* ``GET    {prefix}api/images?mine=1`` → ``{"images"}``: any logged-in user, their own
  private images (admins without ``mine=1``: everyone's)
* ``DELETE {prefix}api/images/{ref}`` → ``{"deleted", "nodes"}``: the image's manifest is
  deleted in the registry, and ``nodes`` lists where a copy was removed; refused (400) for
  images that are not private snapshots, 409 while a session still uses it.
"""
from __future__ import annotations

from tornado import web

from ..snapshots import SnapshotError, Snapshots
from .base import APIHandler, BaseHandler


class SnapshotsBase(BaseHandler):
    @property
    def snapshots(self) -> Snapshots:
        return self.settings["snapshots"]

    @staticmethod
    def refuse(e: SnapshotError):
        raise web.HTTPError(e.status, e.message.replace("%", "%%"))


class SnapshotsAPIHandler(SnapshotsBase, APIHandler):
    async def get(self):
        self.require_admin()
        images, errors = await self.snapshots.images()
        jobs = sorted(self.snapshots.jobs.values(), key=lambda j: j.created_at, reverse=True)
        self.write_json({
            "jobs": [j.to_json() for j in jobs],
            "images": images,
            "sessions": self.snapshots.sessions(),
            "errors": errors,
            "repo": self.snapshots.repo,
            "cap": self.snapshots.cap,
        })

    async def post(self):
        who = self.require_admin()
        body = self.json_body({"user", "server", "tag"})
        try:
            job = await self.snapshots.submit(body.get("user"), body.get("server", ""), body.get("tag"),
                                              requested_by=who["name"] or "bai-scheduler")
        except SnapshotError as e:
            self.refuse(e)
        self.set_header("Location", f"{self.prefix}api/snapshots/{job.id}")
        self.write_json({"job": job.to_json()}, 202)


class SnapshotJobHandler(SnapshotsBase, APIHandler):
    def get(self, job_id):
        self.require_admin()
        job = self.snapshots.jobs.get(job_id)
        if job is None:
            raise web.HTTPError(404, "No such snapshot job (the newest 100 finished jobs are kept).")
        self.write_json({"job": job.to_json()})


class ImagesHandler(SnapshotsBase, APIHandler):
    async def get(self):
        who = self.identity()
        mine = self.get_argument("mine", "") not in ("", "0", "false")
        if who["internal"] and mine:
            raise web.HTTPError(400, "mine=1 needs a user's token.")
        owner = who["name"] if (mine or not who["admin"]) else None
        images, errors = await self.snapshots.images(owner=owner)
        if not who["admin"]:
            # Engine addresses and raw errors are for admins only.
            errors = [f"Images on {len(errors)} node(s) could not be listed, so some of yours may be missing "
                      "here; try again in a minute, and tell an admin if it lasts."] if errors else []
        self.write_json({"images": images, "errors": errors})


class ImageHandler(SnapshotsBase, APIHandler):
    async def delete(self, ref):
        self.require_admin()
        try:
            result = await self.snapshots.delete_image(ref)
        except SnapshotError as e:
            self.refuse(e)
        self.write_json(result)


class SnapshotsPage(SnapshotsBase):
    """The admin panel: running sessions, snapshot action, progress, private images
    (static/snapshots.js fills it from the REST API)."""

    def error_heading(self, status: int) -> str:
        return "Admins only" if status == 403 else "Something went wrong"

    @web.authenticated
    def get(self):
        who = self.identity()
        if not who["admin"]:
            raise web.HTTPError(403, "The snapshot panel is for admins. Ask an admin to turn your "
                                     "session into a private image.")
        mgr = self.snapshots
        self.finish(self.render_template("snapshots.html", who, bai_active="snapshots", repo=mgr.repo, cap=mgr.cap,
                                         pause=mgr.pause, registry=mgr.registry.host))


default_handlers = [
    (r"api/snapshots/?", SnapshotsAPIHandler),
    (r"api/snapshots/([0-9a-f]+)", SnapshotJobHandler),
    (r"api/images/?", ImagesHandler),
    (r"api/images/(.+)", ImageHandler),
    (r"admin/snapshots/?", SnapshotsPage),
]
