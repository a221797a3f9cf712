-- The tables replicas share. Every statement is idempotent: each replica
-- runs this file at start, under an advisory lock.

-- The one leader: who holds the lease, its epoch (one more with every new
-- holder) and when the lease runs out unless renewed.
CREATE TABLE IF NOT EXISTS opamp_leader (
    id         int PRIMARY KEY CHECK (id = 1),
    holder     text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
INSERT INTO opamp_leader VALUES (1, '', 0, 'epoch') ON CONFLICT DO NOTHING;

-- Every replica, with its own lease: a replica whose lease ran out is gone,
-- and its agents are offline. `boot` tells one run of a replica from the next.
CREATE TABLE IF NOT EXISTS opamp_replicas (
    id         text PRIMARY KEY,
    boot       bigint NOT NULL,
    api_url    text NOT NULL,
    agents     integer NOT NULL DEFAULT 0,
    last_seen  timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Each agent as the replica that holds its connection last wrote it. `rev`
-- grows with every write, so a reader asks for what changed since the last
-- `rev` it read; a forgotten agent is a row with no record until swept.
CREATE SEQUENCE IF NOT EXISTS opamp_agent_rev;
CREATE TABLE IF NOT EXISTS opamp_agents (
    uid        bytea PRIMARY KEY,
    replica    text NOT NULL,
    boot       bigint NOT NULL,
    rev        bigint NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    record     jsonb
);
CREATE INDEX IF NOT EXISTS opamp_agents_by_rev ON opamp_agents (rev);
CREATE INDEX IF NOT EXISTS opamp_agents_forgotten ON opamp_agents (written_at) WHERE record IS NULL;

-- Config bodies by hash, written by the leader before the pushes that name them.
CREATE TABLE IF NOT EXISTS opamp_configs (
    hash   bytea PRIMARY KEY,
    bundle jsonb NOT NULL
);

-- Pushes to agents held by another replica than the leader; the replica
-- delivers those of the leader's current epoch and deletes them.
CREATE TABLE IF NOT EXISTS opamp_pushes (
    seq     bigserial PRIMARY KEY,
    replica text NOT NULL,
    uid     bytea NOT NULL,
    hash    bytea NOT NULL,
    epoch   bigint NOT NULL
);

-- The rollout state. `epoch` is the fencing token: the leader of a new epoch
-- claims the row as it loads it, and a save names the epoch it was made in.
CREATE TABLE IF NOT EXISTS opamp_rollout_state (
    id    int PRIMARY KEY CHECK (id = 1),
    epoch bigint NOT NULL,
    state jsonb
);
INSERT INTO opamp_rollout_state VALUES (1, 0, NULL) ON CONFLICT DO NOTHING;
