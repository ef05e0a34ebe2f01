// skypty browser terminal: xterm.js <-> one WebSocket on this page's own path (pty.md §8.3).
// Output arrives as binary frames; keystrokes go out as text frames; window size changes go out
// as {"type":"resize","cols":C,"rows":R}; a {"type":"session","id":…} frame puts ?sid= in the URL
// so a reload re-attaches to the same shell when the host keeps sessions.
(function () {
  "use strict";
  var term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'Menlo, "DejaVu Sans Mono", "Liberation Mono", monospace',
    fontSize: 14,
    lineHeight: 1.2,
    theme: { background: "#101418" }
  });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  var state = document.getElementById("state");
  var closed = false;

  // for tests and debugging from the console
  window.skypty = { term: term, fit: fit, closed: false, closeCode: null, ws: null };

  function showState(text) {
    state.textContent = text;
    state.style.display = text ? "block" : "none";
  }

  function safeFit() {
    try { fit.fit(); } catch (e) { /* not laid out yet */ }
  }
  safeFit();

  var proto = location.protocol === "https:" ? "wss:" : "ws:";
  var ws = new WebSocket(proto + "//" + location.host + location.pathname + location.search);
  ws.binaryType = "arraybuffer";
  window.skypty.ws = ws;

  function send(data) {
    if (ws.readyState === WebSocket.OPEN) ws.send(data);
  }

  function sendSize() {
    if (term.cols > 0 && term.rows > 0) {
      send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
    }
  }

  ws.onopen = function () {
    showState("");
    safeFit();
    sendSize();
    term.focus();
  };

  ws.onmessage = function (ev) {
    if (typeof ev.data === "string") {
      var msg = null;
      try { msg = JSON.parse(ev.data); } catch (e) { /* not ours */ }
      if (msg && msg.type === "session" && typeof msg.id === "string" && /^[0-9a-fA-F]{1,64}$/.test(msg.id)) {
        var url = new URL(location.href);
        url.searchParams.set("sid", msg.id);
        history.replaceState(null, "", url.toString());
      } else if (!msg) {
        term.write(ev.data);
      }
      return;
    }
    term.write(new Uint8Array(ev.data));
  };

  ws.onclose = function (ev) {
    if (closed) return;
    closed = true;
    window.skypty.closed = true;
    window.skypty.closeCode = ev.code;
    var why = ev.reason ? ev.reason : "code " + ev.code;
    term.write("\r\n\x1b[33m[connection closed: " + why + "]\x1b[0m\r\n");
    showState("disconnected \u2014 reload the page to reconnect");
    document.title = "skypty terminal (closed)";
  };

  term.onData(function (d) { send(d); });                       // text frame
  term.onBinary(function (d) {                                  // e.g. mouse reports: raw bytes
    var b = new Uint8Array(d.length);
    for (var i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 0xff;
    send(b);
  });
  term.onResize(function () { sendSize(); });

  var pending = null;
  function onWindowResize() {
    if (pending) return;
    pending = requestAnimationFrame(function () { pending = null; safeFit(); });
  }
  window.addEventListener("resize", onWindowResize);
  if (window.ResizeObserver) new ResizeObserver(onWindowResize).observe(document.getElementById("terminal"));
})();
