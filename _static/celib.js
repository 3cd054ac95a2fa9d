/* Small fixes for readers, loaded on every page (see _ext/celib_book.py). */
(function () {
  "use strict";

  /* 1. The sidebar buttons. pydata-sphinx-theme 0.17 binds its click handler to the *first* element with
     class .primary-toggle (or .secondary-toggle), and sphinx-book-theme 1.3 renders a second one, the one
     readers see; the visible button then does nothing (pydata-sphinx-theme#2451). Every visible button is
     routed here: on a wide window the primary sidebar collapses and comes back in place; on a narrow one the
     theme's own handler opens its drawer, by a click on the button it listens to. */
  function visible(el) { return el.offsetParent !== null && el.getBoundingClientRect().width > 0; }
  function wide() { return window.matchMedia("(min-width: 960px)").matches; }
  function route(selector, collapseClass) {
    const all = Array.from(document.querySelectorAll(selector));
    if (!all.length) return;
    const listened = all[0];
    all.forEach(function (button) {
      button.addEventListener("click", function (event) {
        if (!visible(button) || button === listened && !event.isTrusted) return;
        if (collapseClass && wide()) {
          event.preventDefault();
          event.stopImmediatePropagation();
          const collapsed = document.body.classList.toggle(collapseClass);
          button.setAttribute("aria-expanded", String(!collapsed));
        } else if (button !== listened) {
          event.preventDefault();
          event.stopImmediatePropagation();
          listened.click();
        }
      }, true);
    });
  }

  /* 2. Figures on a phone: at least 55 CSS px per inch of the Matplotlib figure (150 dpi). */
  const DPI = 150, MIN_PX_PER_INCH = 55;
  function sizeFigures() {
    document.querySelectorAll("div.cell_output img").forEach(function (img) {
      function apply() {
        if (!img.naturalWidth) return;
        img.style.minWidth = Math.round(img.naturalWidth / DPI * MIN_PX_PER_INCH) + "px";
        img.classList.add("celib-min-width");
      }
      if (img.complete) apply(); else img.addEventListener("load", apply, { once: true });
    });
  }

  /* 3. Search results: Sphinx builds each snippet from the page's text, raw TeX and the page's contents
     list included. Math, navigation and hidden code are dropped from the text before the snippet is cut. */
  function cleanSearch() {
    // searchtools.js declares Search with const: a global binding, not a property of window
    if (typeof Search === "undefined" || !Search.htmlToText || Search.htmlToText.celib) return;
    const original = Search.htmlToText;
    Search.htmlToText = function (htmlString, anchor) {
      const doc = new DOMParser().parseFromString(htmlString, "text/html");
      doc.querySelectorAll("span.math, div.math, nav, .bd-toc, .toctree-wrapper, #searchbox, " +
        ".tag_hide-input .cell_input, .cell_output, .headerlink").forEach(function (n) { n.remove(); });
      return original(doc.documentElement.outerHTML, anchor);
    };
    Search.htmlToText.celib = true;
  }

  /* 4. Downloads the theme's menu does not know: the book's source on every page, and the whole-book PDF
     where the build found one (`make pdf`; _ext/celib_book.py marks such pages with
     <meta name="celib-book-pdf">). */
  function addDownload(cls, file, icon, text) {
    const root = document.documentElement.dataset.content_root || "";
    const menu = document.querySelector(".dropdown-download-buttons ul");
    if (!menu || menu.querySelector("." + cls)) return;
    const item = document.createElement("li");
    item.innerHTML = '<a href="' + root + '_static/' + file + '" class="btn btn-sm dropdown-item ' + cls +
      '"><span class="btn__icon-container"><i class="fas ' + icon + '"></i></span>' +
      '<span class="btn__text-container">' + text + "</span></a>";
    menu.appendChild(item);
  }

  function ready() {
    route(".primary-toggle", "celib-primary-collapsed");
    route(".secondary-toggle", null);
    sizeFigures();
    cleanSearch();
    addDownload("celib-source", "crossentropy-book-src.tar.gz", "fa-file-archive", "source (.tar.gz)");
    if (document.querySelector('meta[name="celib-book-pdf"]'))
      addDownload("celib-book-pdf", "crossentropy-book.pdf", "fa-file-pdf", "whole book (.pdf)");
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", ready);
  else ready();
  window.addEventListener("load", cleanSearch);
})();
