// Full-window terminal: xterm.js <-> terminado websocket (JSON frames).
(function () {
  "use strict";
  // The page must be served with a trailing slash for relative URLs to work.
  if (!location.pathname.endsWith("/")) {
    location.replace(location.pathname + "/" + location.search);
    return;
  }
  var status = document.getElementById("status");
  var term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("term"));
  fit.fit();
  term.focus();

  var scheme = location.protocol === "https:" ? "wss://" : "ws://";
  var ws = new WebSocket(scheme + location.host + location.pathname + "websocket");

  function send(msg) {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
  }
  function sendSize() { send(["set_size", term.rows, term.cols]); }

  ws.onopen = function () { status.textContent = ""; sendSize(); };
  ws.onmessage = function (ev) {
    var msg = JSON.parse(ev.data);
    if (msg[0] === "stdout") term.write(msg[1]);
    else if (msg[0] === "disconnect") status.textContent = "shell exited; reload to start a new one";
  };
  ws.onclose = function () {
    status.textContent = "disconnected; reload to reconnect";
    term.options.disableStdin = true;
  };
  term.onData(function (data) { send(["stdin", data]); });
  window.addEventListener("resize", function () { fit.fit(); });
  term.onResize(sendSize);
  document.title = "Terminal";
  term.onTitleChange(function (t) { if (t) document.title = t; });
})();
