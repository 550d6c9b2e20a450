// The callback queue refreshes its rows every 3 s, so a patient's answer shows
// up without reloading the page.  Plain fetch: nothing loaded from elsewhere.
(function () {
  "use strict";
  var table = document.getElementById("queue");
  if (!table) { return; }
  var body = table.querySelector("tbody");
  function refresh() {
    fetch(table.dataset.rows, {credentials: "same-origin", headers: {"X-Requested-With": "fetch"}})
      .then(function (r) {
        // A session that ended sends the login page: show it, not inside the table.
        if (r.redirected) { window.location.reload(); return Promise.reject("login"); }
        return r.ok ? r.text() : Promise.reject(r.status);
      })
      .then(function (html) { body.innerHTML = html; table.dataset.refreshed = String(Date.now()); })
      .catch(function () { table.dataset.stale = "1"; })
      .finally(function () { setTimeout(refresh, 3000); });
  }
  setTimeout(refresh, 3000);
}());
