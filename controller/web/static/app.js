// Flotilla dashboard: live updates over Server-Sent Events, no build step.
// The server sends HTML fragments (rendered by the same templates as the page) keyed by
// element id; this script swaps them in. EventSource reconnects by itself after a
// network error; after an HTTP error (server restarted, session gone) it is closed, so
// we probe the page and either reload (to the login page) or open a new stream.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-stream");
  var live = document.getElementById("live");

  function setLive(state, text) {
    if (!live) return;
    live.setAttribute("data-state", state);
    live.textContent = text;
  }

  function apply(msg) {
    var frags = msg.fragments || {};
    Object.keys(frags).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) el.outerHTML = frags[id];
    });
    var order = msg.order || {};
    Object.keys(order).forEach(function (parentId) {
      var parent = document.getElementById(parentId);
      if (!parent) return;
      order[parentId].forEach(function (id) {
        var el = document.getElementById(id);
        if (el) parent.appendChild(el);
      });
    });
    body.setAttribute("data-updates", String(Number(body.getAttribute("data-updates") || 0) + 1));
  }

  var source = null;
  var timer = null;

  function probe() {
    fetch(location.href, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (r.redirected || r.status === 401 || r.status === 403) location.reload();
      else connect();
    }, function () {
      timer = setTimeout(probe, 2000);
    });
  }

  function connect() {
    if (!url || !window.EventSource) return;
    if (source) source.close();
    source = new EventSource(url);
    source.addEventListener("open", function () { setLive("live", "live"); });
    source.addEventListener("fragments", function (e) { apply(JSON.parse(e.data)); });
    source.addEventListener("error", function () {
      setLive("down", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        clearTimeout(timer);
        timer = setTimeout(probe, 1000);
      }
    });
  }

  // Destructive choices are confirmed before an answer is sent; so are other actions
  // whose form carries data-confirm. Without JavaScript the server asks for the checkbox.
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var picked = form.querySelectorAll("input[data-destructive]:checked");
    if (picked.length) {
      var names = Array.prototype.map.call(picked, function (i) { return i.value; }).join(", ");
      if (!window.confirm("Destructive choice: " + names + ". Send this answer?")) {
        e.preventDefault();
        return;
      }
      var box = form.querySelector("input[name=confirm_destructive]");
      if (box) box.checked = true;
    }
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) e.preventDefault();
  });

  connect();
})();
