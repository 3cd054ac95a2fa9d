// What sticks out of its column, in the article and both sidebars: an element wider than the column that
// is not inside a scroll container, an element whose content is clipped (overflow hidden), and any
// container other than the book's scroll boxes (equations, tables, cell outputs, code) that scrolls
// sideways. Returns a list of descriptions; empty when the page fits.
const bad = [];
const boxes = 'div.math, .pst-scrollable-table-container, div.cell_output, div.highlight pre, div.highlight';
const scrolls = (el) => ['auto', 'scroll'].includes(getComputedStyle(el).overflowX);
const name = (el) => el.tagName.toLowerCase() + '.' + String(el.className.baseVal ?? el.className).split(' ')[0];
const text = (el) => ' "' + (el.textContent || '').trim().slice(0, 50) + '"';
for (const column of document.querySelectorAll('main article, .bd-sidebar-secondary, .bd-sidebar-primary')) {
  const box = column.getBoundingClientRect(), style = getComputedStyle(column);
  if (box.width === 0 || style.display === 'none') continue;
  const left = box.left + parseFloat(style.paddingLeft), right = box.right - parseFloat(style.paddingRight);
  for (const el of column.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const cs = getComputedStyle(el);
    if (cs.visibility === 'hidden' || cs.position === 'fixed') continue;
    if (el.parentElement.closest('svg, mjx-assistive-mml')) continue;  // parts of a picture or an equation
    if (scrolls(el) && el.scrollWidth > el.clientWidth + 1 && !el.matches(boxes))
      bad.push('scrolls sideways: ' + name(el) + ' ' + el.scrollWidth + ' > ' + el.clientWidth + text(el));
    let up = el.parentElement, inside = false;
    while (up && up !== column) { if (scrolls(up)) { inside = true; break; } up = up.parentElement; }
    if (inside) continue;
    if (r.right > right + 1 || r.left < left - 1)
      bad.push('wider than its column: ' + name(el) + ' ' + Math.round(r.left) + '..' + Math.round(r.right) +
               ' in ' + Math.round(left) + '..' + Math.round(right) + text(el));
    else if (['hidden', 'clip'].includes(cs.overflowX) && el.scrollWidth > el.clientWidth + 8)
      bad.push('clipped: ' + name(el) + ' ' + el.scrollWidth + ' > ' + el.clientWidth + text(el));
  }
}
if (document.documentElement.scrollWidth > window.innerWidth + 1)
  bad.push('the page is ' + document.documentElement.scrollWidth + ' px wide in a ' + window.innerWidth + ' px window');
return bad;
