"""Every Docker label BAI Hub reads or writes, under one prefix.

Images:
    {PREFIX}kind          "kernel" for catalog images, "private" for snapshots
    {PREFIX}name          recipe name (kernel images)
    {PREFIX}framework     e.g. "scikit-learn", "pytorch"
    {PREFIX}version       framework version, e.g. "1.6.1"
    {PREFIX}display-name  what the form shows, e.g. "scikit-learn 1.6"
    {PREFIX}python        python version inside, e.g. "3.11"
    {PREFIX}recipe-hash   hash of the recipe that built it (cache key)
    {PREFIX}owner         private images: the only user who may launch it
    {PREFIX}source-image  private images: the image the session ran
    {PREFIX}source-session private images: "user/server" snapshotted
    {PREFIX}created       private images: ISO time of the snapshot
    {PREFIX}snapshot-job  private images: the snapshot job that made it

Containers:
    {PREFIX}hub                    the hub deployment the session belongs to (several
                                   hubs may share an engine; each sees only its own)
    {PREFIX}user, {PREFIX}server   whose session this is
    {PREFIX}node                   scheduler node name
    {PREFIX}devices                comma-separated GPU uuids
    {PREFIX}quanta                 comma-separated quanta, one per device
    {PREFIX}fgpu                   total fGPU as shown to users, e.g. "0.5"
    {PREFIX}cpu-millis, {PREFIX}memory-bytes
    {PREFIX}request-id             the scheduler admission this container belongs to
    {PREFIX}group                  the JupyterHub group whose quota the session counts against
    {PREFIX}probe                  "1": a GPU-readiness check of the scheduler (removed at once)
"""

PREFIX = "org.bai-hub."

KIND = PREFIX + "kind"
NAME = PREFIX + "name"
FRAMEWORK = PREFIX + "framework"
VERSION = PREFIX + "version"
DISPLAY_NAME = PREFIX + "display-name"
PYTHON = PREFIX + "python"
RECIPE_HASH = PREFIX + "recipe-hash"
OWNER = PREFIX + "owner"
SOURCE_IMAGE = PREFIX + "source-image"
SOURCE_SESSION = PREFIX + "source-session"
CREATED = PREFIX + "created"
SNAPSHOT_JOB = PREFIX + "snapshot-job"

USER = PREFIX + "user"
SERVER = PREFIX + "server"
NODE = PREFIX + "node"
DEVICES = PREFIX + "devices"
QUANTA = PREFIX + "quanta"
FGPU = PREFIX + "fgpu"
CPU_MILLIS = PREFIX + "cpu-millis"
MEMORY_BYTES = PREFIX + "memory-bytes"
REQUEST_ID = PREFIX + "request-id"
HUB = PREFIX + "hub"
IMAGE = PREFIX + "image"
GROUP = PREFIX + "group"
PROBE = PREFIX + "probe"

KIND_KERNEL = "kernel"
KIND_PRIVATE = "private"

# Name prefix for everything tests create (containers, volumes, images), so
# one filter removes all of it.
TEST_PREFIX = "bai-test-"
