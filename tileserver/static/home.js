// The map page: layers described by the server in #layer-data (see tileserver/services/home.py).
'use strict';
(function () {
  const data = JSON.parse(document.getElementById('layer-data').textContent);
  const map = L.map('map', {worldCopyJump: true, maxZoom: data.maxZoom});
  window.tileserverMap = map;  // for tests and the browser console

  // Tiles of a PM pyramid: only those inside the limits of the level drawn (coords.z is the native
  // zoom, clamped between minNativeZoom and maxNativeZoom), so nothing is asked that would be a 404.
  const LimitedTiles = L.TileLayer.extend({
    _isValidTile: function (coords) {
      const c = this._wrapCoords(coords);
      const lim = this.options.limits[c.z];
      return !!lim && c.x >= lim[0] && c.x <= lim[2] && c.y >= lim[1] && c.y <= lim[3];
    }
  });

  // Vector tiles: a MapLibre GL map drawn as a Leaflet layer (@maplibre/maplibre-gl-leaflet), stacked
  // among the tile layers by zIndex and faded by opacity like them. Loaded only when the page has one.
  const VectorTiles = window.L.MaplibreGL && L.MaplibreGL.extend({
    onAdd: function (map) {
      L.MaplibreGL.prototype.onAdd.call(this, map);
      this._container.style.zIndex = this.options.zIndex;
      this._container.style.opacity = this.options.opacity;
    },
    setOpacity: function (opacity) {
      this.options.opacity = opacity;
      if (this._container) this._container.style.opacity = opacity;
      return this;
    }
  });

  // Leaflet puts a string tooltip in as HTML: titles go in as text
  function text(value) {
    const span = document.createElement('span');
    span.textContent = value;
    return span;
  }

  function mapLayer(layer, zIndex) {
    const d = layer.draw;
    const common = {bounds: layer.bounds, minZoom: d.minZoom, maxZoom: d.maxZoom, opacity: d.opacity,
                    zIndex: zIndex, attribution: d.attribution};
    if (d.kind === 'maplibre') {
      // MapLibre fetches the style with an absolute URL; the style's own URLs are absolute already
      return new VectorTiles({style: new URL(d.url, document.baseURI).href, zIndex: zIndex, opacity: d.opacity,
                              interactive: false});
    }
    if (d.kind === 'wmts') {
      return new LimitedTiles(d.url, Object.assign(common, {
        minNativeZoom: d.minNativeZoom, maxNativeZoom: d.maxNativeZoom, limits: d.limits}));
    }
    return L.tileLayer.wms(d.url, Object.assign(common, {
      layers: layer.id, styles: d.style, format: 'image/png', transparent: true, version: '1.3.0'}));
  }

  // the view first: vector layers (outlines) need one when they are added. A layer with no extent
  // (a WFS layer whose tables are empty) is listed but has nothing to outline.
  const placed = data.layers.filter(function (layer) { return layer.bounds; });
  if (placed.length) {
    const all = L.latLngBounds(placed[0].bounds);
    placed.forEach(function (layer) { all.extend(L.latLngBounds(layer.bounds)); });
    const finest = Math.max.apply(null, placed.map(function (l) { return l.fitZoom; }));
    map.fitBounds(all, {padding: [20, 20], maxZoom: finest});
  } else {
    map.setView([46.5, 2.5], 5);
  }

  const byIndex = {};  // by position in data.layers (a raster and a vector layer may share a name)
  const n = data.layers.length;
  data.layers.forEach(function (layer, i) {
    if (!layer.bounds) return;
    const bounds = L.latLngBounds(layer.bounds);
    // the extent outline: a layer too small for the zoom still shows where it is
    const outline = L.rectangle(bounds, {color: layer.colour, weight: 2, fill: false,
                                         dashArray: layer.kind === 'vector' ? '6 4' : null});  // not drawn
    outline.bindTooltip(text(layer.title));
    outline.addTo(map);
    // ... and a marker while the outline is too small to see
    const marker = L.circleMarker(bounds.getCenter(), {radius: 7, color: layer.colour, weight: 2, fillOpacity: 0.3});
    marker.bindTooltip(text(layer.title));
    const tiles = layer.draw ? mapLayer(layer, n - i) : null;  // first = smallest = on top
    const shown = !layer.draw || layer.draw.shown !== false;  // past a few WebGL layers, hidden at first
    if (tiles && shown) tiles.addTo(map);
    if (!shown) outline.remove();
    byIndex[i] = {layer: layer, bounds: bounds, outline: outline, marker: marker, tiles: tiles, shown: shown};
  });

  const MARKER_BELOW = 12;  // pixels: an extent smaller than this on screen gets a marker
  function updateMarkers() {
    Object.values(byIndex).forEach(function (entry) {
      const sw = map.latLngToLayerPoint(entry.bounds.getSouthWest());
      const ne = map.latLngToLayerPoint(entry.bounds.getNorthEast());
      const small = Math.max(Math.abs(ne.x - sw.x), Math.abs(ne.y - sw.y)) < MARKER_BELOW;
      if (entry.shown && small) entry.marker.addTo(map); else map.removeLayer(entry.marker);
    });
  }
  map.on('zoomend', updateMarkers);

  function zoomTo(entry) {
    map.fitBounds(entry.bounds, {maxZoom: entry.layer.fitZoom});
  }

  document.querySelectorAll('#layers > li.layer').forEach(function (item) {
    const entry = byIndex[item.dataset.index];
    if (!entry) return;
    item.querySelector('.zoom-to').addEventListener('click', function () { zoomTo(entry); });
    entry.outline.on('click', function () { zoomTo(entry); });
    entry.marker.on('click', function () { zoomTo(entry); });
    const visible = item.querySelector('.visible');
    if (visible) {
      visible.addEventListener('change', function () {
        entry.shown = visible.checked;
        [entry.tiles, entry.outline].forEach(function (l) {
          if (!l) return;
          if (entry.shown) l.addTo(map); else map.removeLayer(l);
        });
        updateMarkers();
      });
    }
    const opacity = item.querySelector('.opacity');
    if (opacity) {
      opacity.addEventListener('input', function () { entry.tiles.setOpacity(opacity.value / 100); });
    }
  });

  updateMarkers();
})();
