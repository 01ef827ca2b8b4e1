-- Upstreams (pools of backend targets) are a fifth entity kind, stored like
-- the others: the entity as JSON (key order kept, see 0002) beside its name,
-- tags and version. LIKE routes INCLUDING ALL copies the primary key and the
-- GIN index on tags (as upstreams_tags_idx), so no index is created here.
CREATE TABLE upstreams (LIKE routes INCLUDING ALL);
