// medloop's clinicians' pages: keyboard shortcuts and the image viewer. Plain JavaScript, loaded
// from the service itself (the Content-Security-Policy allows no inline script and no other host).
(function () {
  "use strict";

  function typing(event) {
    var target = event.target;
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }

  function worklist() {
    var links = Array.prototype.slice.call(document.querySelectorAll("#worklist a.case-link"));
    if (!links.length) { return; }
    var index = -1;
    function select(next) {
      index = Math.max(0, Math.min(links.length - 1, next));
      links.forEach(function (link, i) { link.closest("tr").classList.toggle("selected", i === index); });
      links[index].focus();
    }
    links.forEach(function (link, i) { link.addEventListener("focus", function () { index = i; }); });
    document.addEventListener("keydown", function (event) {
      if (typing(event) || event.altKey || event.ctrlKey || event.metaKey) { return; }
      if (event.key === "j" || event.key === "ArrowDown") { event.preventDefault(); select(index + 1); }
      else if (event.key === "k" || event.key === "ArrowUp") { event.preventDefault(); select(index - 1); }
    });
  }

  function caseKeys() {
    var form = document.getElementById("feedback");
    if (!form) { return; }
    var sent = false;
    form.addEventListener("submit", function () { sent = true; });
    document.addEventListener("keydown", function (event) {
      if (typing(event) || event.altKey || event.ctrlKey || event.metaKey || sent) { return; }
      var button = form.querySelector('button[data-key="' + event.key + '"]');
      if (button) { event.preventDefault(); button.click(); return; }
      var link = event.key === "n" ? document.getElementById("next") : event.key === "p" ? document.getElementById("previous") : null;
      if (link) { event.preventDefault(); window.location.href = link.href; return; }
      var toggle = document.getElementById("overlay-toggle");
      if (event.key === "g" && toggle) { event.preventDefault(); toggle.click(); }
    });
  }

  function viewer() {
    var stack = document.getElementById("stack");
    var image = document.getElementById("case-image");
    if (!stack || !image) { return; }
    var zoom = document.getElementById("zoom");
    var zoomValue = document.getElementById("zoom-value");
    if (zoom) {
      zoom.addEventListener("input", function () {
        stack.style.transform = "scale(" + (zoom.value / 100) + ")";
        zoomValue.textContent = zoom.value + "%";
      });
    }
    var apply = document.getElementById("apply-window");
    if (apply) {
      apply.addEventListener("click", function () {
        var center = document.getElementById("window-center").value;
        var width = document.getElementById("window-width").value;
        var query = center !== "" && width !== "" ? "?center=" + encodeURIComponent(center) + "&width=" + encodeURIComponent(width) : "";
        image.src = image.getAttribute("data-src") + query;
      });
    }
    var toggle = document.getElementById("overlay-toggle");
    var overlay = document.getElementById("overlay");
    var blend = document.getElementById("blend");
    var blendValue = document.getElementById("blend-value");
    if (toggle && overlay && blend) {
      toggle.addEventListener("change", function () {
        if (toggle.checked && !overlay.getAttribute("src")) { overlay.src = overlay.getAttribute("data-src"); }
        overlay.classList.toggle("hidden", !toggle.checked);
        blend.disabled = !toggle.checked;
      });
      blend.addEventListener("input", function () {
        overlay.style.opacity = String(blend.value / 100);
        blendValue.textContent = blend.value + "%";
      });
      overlay.style.opacity = String(blend.value / 100);
    }
  }

  document.addEventListener("DOMContentLoaded", function () { worklist(); caseKeys(); viewer(); });
}());
