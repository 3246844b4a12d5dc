// reportgen: small progressive enhancements. Every page reads fine without this script.
(function () {
  "use strict";

  // The explorer: one layer slider for two views of the model input. The first shows one tile of
  // the sprite sheet (rows: layers; columns: each method's, e.g. heads then mean over heads, then
  // rollout), chosen with the menu; the second, where the chosen patch attends (setUpPatchView).
  function setUpExplorer(root) {
    var layers = parseInt(root.getAttribute("data-layers"), 10);
    var query = root.getAttribute("data-query") || "CLS";
    var start = parseInt(root.getAttribute("data-rollout-start") || "1", 10);
    var columns = {
      mean: parseInt(root.getAttribute("data-mean-column"), 10),
      rollout: parseInt(root.getAttribute("data-rollout-column"), 10)
    };
    var sprite = root.querySelector(".explorer-stage .tile img");
    var layer = root.querySelector("input[name=layer]");
    var map = root.querySelector("select[name=map]");
    var label = root.querySelector(".explorer-label");
    var controls = root.querySelector(".controls");
    if (!layers || !sprite || !layer || !map || !label || !controls) { return; }

    function show() {
      var l = parseInt(layer.value, 10) - 1;
      var kind = map.value;
      var column = kind in columns ? columns[kind] : parseInt(kind.slice(1), 10);
      sprite.style.left = (-100 * column) + "%";
      sprite.style.top = (-100 * l) + "%";
      var what = kind === "mean" ? query + " attention, mean over heads"
        : kind === "rollout" ? (l + 1 >= start ? "attention rollout through layers " + start + " to " + (l + 1)
                                : "attention rollout before its start layer " + start + ": the identity")
        : kind.charAt(0) === "c" ? map.options[map.selectedIndex].text
        : query + " attention of head " + (parseInt(kind.slice(1), 10) + 1);  // heads from 1, as layers
      var text = "Layer " + (l + 1) + " of " + layers + ": " + what;
      sprite.alt = text;
      label.textContent = text;
    }
    layer.addEventListener("input", show);
    map.addEventListener("change", show);
    controls.hidden = false;
    show();
    var patches = root.querySelector(".patch-view");
    if (patches) { setUpPatchView(root, patches, layer); }
  }

  // Where each patch attends: a grid of buttons over the model input; the chosen patch's tile of
  // the patch sprite (tile column: the patch's column; tile row: (layer - first layer) * rows + its
  // row) is shown over the input. Arrow keys move the chosen patch, Home and End go to the row's
  // ends. Layers before the first one kept show the input alone, and say so.
  function setUpPatchView(root, view, layer) {
    var rows = parseInt(view.getAttribute("data-rows"), 10);
    var cols = parseInt(view.getAttribute("data-cols"), 10);
    var layers = parseInt(view.getAttribute("data-layers"), 10);
    var first = parseInt(view.getAttribute("data-first-layer"), 10);
    var sprite = view.querySelector(".tile img");
    var marker = view.querySelector(".patch-marker");
    var grid = view.querySelector(".patch-grid");
    var label = view.querySelector(".patch-label");
    if (!rows || !cols || !layers || !first || !sprite || !grid || !label) { return; }
    var last = first + layers - 1;
    var chosen = { r: rows >> 1, c: cols >> 1 };
    var buttons = [];

    grid.style.gridTemplateColumns = "repeat(" + cols + ", 1fr)";
    grid.style.gridTemplateRows = "repeat(" + rows + ", 1fr)";
    for (var r = 0; r < rows; r++) {
      for (var c = 0; c < cols; c++) {
        var button = document.createElement("button");
        button.type = "button";
        button.tabIndex = -1;
        button.setAttribute("aria-pressed", "false");
        button.setAttribute("aria-label", "Patch at row " + (r + 1) + ", column " + (c + 1));
        button.setAttribute("data-row", r);
        button.setAttribute("data-col", c);
        grid.appendChild(button);
        buttons.push(button);
      }
    }
    if (marker) { marker.remove(); }  // the chosen button is outlined instead

    function show() {
      var l = parseInt(layer.value, 10);
      var where = "where the patch at row " + (chosen.r + 1) + ", column " + (chosen.c + 1) + " attends";
      var kept = l >= first;
      sprite.parentNode.hidden = !kept;
      if (kept) {
        sprite.style.left = (-100 * chosen.c) + "%";
        sprite.style.top = (-100 * ((l - first) * rows + chosen.r)) + "%";
      }
      var text = kept ? "Layer " + l + " of " + last + ": " + where + ", mean over heads"
        : "Layer " + l + " of " + last + ": " + where + " is kept for " +
          (first === last ? "the last layer only" : "layers " + first + " to " + last + " only");
      sprite.alt = text;
      label.textContent = text;
    }

    function choose(r, c, focus) {
      var before = buttons[chosen.r * cols + chosen.c];
      before.tabIndex = -1;
      before.setAttribute("aria-pressed", "false");
      chosen = { r: Math.min(Math.max(r, 0), rows - 1), c: Math.min(Math.max(c, 0), cols - 1) };
      var now = buttons[chosen.r * cols + chosen.c];
      now.tabIndex = 0;
      now.setAttribute("aria-pressed", "true");
      if (focus) { now.focus(); }
      show();
    }

    var MOVES = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    grid.addEventListener("click", function (event) {
      var target = event.target.closest("button");
      if (target) {
        choose(parseInt(target.getAttribute("data-row"), 10), parseInt(target.getAttribute("data-col"), 10), true);
      }
    });
    grid.addEventListener("keydown", function (event) {
      var move = MOVES[event.key];
      if (move) {
        choose(chosen.r + move[0], chosen.c + move[1], true);
      } else if (event.key === "Home" || event.key === "End") {
        choose(chosen.r, event.key === "Home" ? 0 : cols - 1, true);
      } else {
        return;
      }
      event.preventDefault();
    });
    layer.addEventListener("input", show);
    grid.hidden = false;
    Array.prototype.forEach.call(root.querySelectorAll(".patch-help"), function (p) { p.hidden = false; });
    Array.prototype.forEach.call(root.querySelectorAll(".patch-static-note"), function (p) { p.hidden = true; });
    choose(chosen.r, chosen.c, false);
  }

  // Sortable tables: click a column header to sort by it (numbers numerically), again to reverse.
  // A row with nothing in the column (a failed image's row has one wide cell; "—" or "n/a" mark a
  // missing value, "–" an undefined entropy) goes after the others in either direction.
  var MISSING = ["", "\u2014", "\u2013", "n/a"];

  function sortKey(row, column) {
    var start = 0;
    for (var i = 0; i < row.cells.length; i++) {
      var cell = row.cells[i];
      if (column < start + cell.colSpan) {
        if (cell.colSpan > 1) { return null; }
        var text = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
        if (MISSING.indexOf(text) >= 0) { return null; }
        var number = Number(text);
        return isFinite(number) ? number : text;
      }
      start += cell.colSpan;
    }
    return null;
  }

  function compareKeys(x, y) {
    if (typeof x === "number" && typeof y === "number") { return x - y; }
    if (typeof x === "number") { return -1; }  // numbers before text, so the order is consistent
    if (typeof y === "number") { return 1; }
    return x.localeCompare(y);
  }

  function setUpSorting(table) {
    var headers = table.querySelectorAll("thead th");
    Array.prototype.forEach.call(headers, function (th, column) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      while (th.firstChild) { button.appendChild(th.firstChild); }
      th.appendChild(button);
      button.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.map.call(body.rows, function (row) {
          return { row: row, key: sortKey(row, column) };
        });
        rows.sort(function (a, b) {
          if (a.key === null || b.key === null) { return (a.key === null) - (b.key === null); }
          var order = compareKeys(a.key, b.key);
          return ascending ? order : -order;
        });
        rows.forEach(function (item) { body.appendChild(item.row); });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll(".explorer"), setUpExplorer);
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), setUpSorting);
    // Sentences about sorting are shown only where the headers sort.
    Array.prototype.forEach.call(document.querySelectorAll(".sort-hint"), function (hint) { hint.hidden = false; });
  });
})();
