// The copy button of a key shown once: the page works without it (the key is on the page to select by hand).
"use strict";
document.querySelectorAll("button[data-copy]").forEach(function (button) {
  var source = document.getElementById(button.getAttribute("data-copy"));
  if (!source || !navigator.clipboard) { return; }
  button.hidden = false;
  button.addEventListener("click", function () {
    navigator.clipboard.writeText(source.textContent.trim()).then(function () {
      var said = button.parentNode.querySelector(".copied");
      if (said) { said.hidden = false; }
    });
  });
});
