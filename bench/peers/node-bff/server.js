// A hand-written backend-for-frontend, written the way a Node team would:
// fastify + undici, one process per core (cluster). It serves the same
// dashboard as Manifold's composition in bench/compose.sh: three backend
// calls in parallel, the user call required, the others optional, the same
// reshaped JSON and the same cache-control header.
'use strict';
const cluster = require('node:cluster');
const os = require('node:os');

const PORT = Number(process.env.PORT || 18110);
const USERS = process.env.USERS_URL;
const ORDERS = process.env.ORDERS_URL;
const REVIEWS = process.env.REVIEWS_URL;

if (cluster.isPrimary) {
  const n = Number(process.env.WORKERS || os.availableParallelism());
  for (let i = 0; i < n; i++) cluster.fork();
} else {
  const fastify = require('fastify')({ logger: false });
  const { Pool } = require('undici');
  const pools = {
    users: new Pool(USERS, { connections: 256, pipelining: 1 }),
    orders: new Pool(ORDERS, { connections: 256, pipelining: 1 }),
    reviews: new Pool(REVIEWS, { connections: 256, pipelining: 1 }),
  };

  async function getJson(pool, path, timeoutMs) {
    const { statusCode, body } = await pool.request({ path, method: 'GET', headersTimeout: timeoutMs, bodyTimeout: timeoutMs });
    if (statusCode < 200 || statusCode > 299) {
      await body.dump();
      const err = new Error('backend status ' + statusCode);
      err.statusCode = statusCode;
      throw err;
    }
    return body.json();
  }

  fastify.get('/v1/users/:id/dashboard', async (req, reply) => {
    const id = encodeURIComponent(req.params.id);
    const [user, orders, reviews] = await Promise.allSettled([
      getJson(pools.users, `/users/${id}`, 2000),
      getJson(pools.orders, `/orders?user=${id}&limit=5`, 2000),
      getJson(pools.reviews, `/reviews?user=${id}`, 2000),
    ]);
    if (user.status === 'rejected') {
      reply.code(502);
      return { error: { code: 'upstream_error', message: 'call "user" failed' } };
    }
    reply.header('cache-control', 'private, max-age=10');
    return {
      id: user.value.id ?? null,
      name: user.value.name ?? null,
      tier: user.value.tier ?? null,
      orders: orders.status === 'fulfilled' ? orders.value.items ?? null : null,
      rating: reviews.status === 'fulfilled' ? reviews.value.average ?? null : null,
    };
  });

  // bench/compose-cache.sh: the same dashboard with a product per order
  // line from a catalog, one request per product (as most BFFs do it) or
  // through a small in-process cache (a Map per worker process, 60 s).
  const CATALOG = process.env.CATALOG_URL;
  if (CATALOG) {
    pools.catalog = new Pool(CATALOG, { connections: 256, pipelining: 1 });
    const cache = new Map();
    const product = async (id, cached) => {
      if (!cached) return getJson(pools.catalog, `/products/${encodeURIComponent(id)}`, 2000);
      const hit = cache.get(id);
      if (hit && hit.until > Date.now()) return hit.value;
      const value = await getJson(pools.catalog, `/products/${encodeURIComponent(id)}`, 2000);
      cache.set(id, { value, until: Date.now() + 60000 });
      return value;
    };
    for (const [prefix, cached] of [['node', false], ['node-cache', true]]) {
      fastify.get(`/${prefix}/users/:id/dashboard`, async (req, reply) => {
        const id = encodeURIComponent(req.params.id);
        let user, orders;
        try {
          [user, orders] = await Promise.all([getJson(pools.users, `/users/${id}`, 2000), getJson(pools.orders, `/orders?user=${id}`, 2000)]);
        } catch (e) {
          reply.code(502);
          return { error: { code: 'upstream_error', message: 'a call failed' } };
        }
        const ids = (orders.items || []).map((i) => i.product_id);
        // At most 8 at a time, in order, as Manifold's max_concurrency: 8.
        const products = new Array(ids.length);
        let next = 0;
        const worker = async () => {
          while (next < ids.length) {
            const k = next++;
            products[k] = await product(ids[k], cached);
          }
        };
        try {
          await Promise.all(Array.from({ length: Math.min(8, ids.length) }, worker));
        } catch (e) {
          reply.code(502);
          return { error: { code: 'upstream_error', message: 'call "products" failed' } };
        }
        return { id: user.id ?? null, name: user.name ?? null, products };
      });
    }
  }

  fastify.listen({ port: PORT, host: '127.0.0.1' }).catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
