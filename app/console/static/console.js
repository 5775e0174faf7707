// subledger console: the only script. Progressive enhancement: every <time> gets its local time
// in the hover title (the page itself shows UTC and works without this file).
document.querySelectorAll("time[datetime]").forEach(function (el) {
  var d = new Date(el.getAttribute("datetime"));
  if (!isNaN(d)) { el.title = d.toLocaleString() + " (local) · " + el.getAttribute("datetime"); }
});
