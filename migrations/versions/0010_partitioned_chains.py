"""Partitioned hash chains: heads of chains 1..n-1, the epochs the number of chains changed at, and a
begin that locks only the heads of the batch's chains (docs/scale-out.md).

- `log_head` stays chain 0's head (and the only one of a log that never had more), so a log written
  with one chain is read, continued and verified exactly as before.
- `log_heads`: one row per chain above 0 of the current epoch.
- `log_epochs`: each change of the number of chains (none: the log has only ever had one), with the
  first position of the epoch, the seal its chains start from and how many entries came before.
- `subledger_ingest_begin` takes the epoch lock in shared mode (a change takes it exclusively, so it
  waits for in-flight ingests), then locks chain 0 (`log_head`) if the batch has an entry in it and
  the batch's other chains' heads in ascending order, then does what 0004's did: the duplicate check
  after the locks, the states locked in key order, the identity links.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"
EPOCH_LOCK = 0x5B1ED6E7  # store/log.py EPOCH_LOCK; migration 0x5B1ED6E5, prune 0x5B1ED6E6

SHARED_TAIL = """
  SELECT coalesce(array_agg(l.source || chr(31) || l.external_id), '{}') INTO seen
    FROM event_log l
    JOIN jsonb_to_recordset(p->'entries') AS k(source text, external_id text)
      ON l.source = k.source AND l.external_id = k.external_id;
  SELECT coalesce(jsonb_object_agg(s.key, s.state), '{}') INTO states
    FROM (SELECT key, state FROM subscriptions
          WHERE key IN (SELECT jsonb_array_elements_text(p->'keys')) ORDER BY key FOR UPDATE) s;
  SELECT coalesce(jsonb_object_agg(l.store_subscription, l.app_user_id), '{}') INTO links
    FROM identity_links l
    JOIN jsonb_to_recordset(p->'links') AS k(app_id text, store_subscription text)
      ON l.app_id = k.app_id AND l.store_subscription = k.store_subscription;
"""


def upgrade() -> None:
    op.execute(
        f"""
        CREATE TABLE log_heads (
          chain integer PRIMARY KEY CHECK (chain > 0),
          position bigint NOT NULL,
          hash bytea NOT NULL
        );
        CREATE TABLE log_epochs (
          epoch integer PRIMARY KEY CHECK (epoch > 0),
          chains integer NOT NULL CHECK (chains > 0),
          first_position bigint NOT NULL,
          seal bytea NOT NULL,
          entries_before bigint NOT NULL,
          started_at timestamptz NOT NULL
        );
        GRANT SELECT, INSERT, UPDATE, DELETE ON log_heads TO {APP_ROLE};
        GRANT SELECT, INSERT ON log_epochs TO {APP_ROLE};

        DROP FUNCTION subledger_ingest_begin(jsonb);
        CREATE FUNCTION subledger_ingest_begin(
          p jsonb, OUT chain_count integer, OUT head_chains integer[], OUT head_positions bigint[],
          OUT head_hashes bytea[], OUT seen text[], OUT states jsonb, OUT links jsonb)
        LANGUAGE plpgsql VOLATILE AS $$
        DECLARE
          wanted integer[];
        BEGIN
          PERFORM pg_advisory_xact_lock_shared({EPOCH_LOCK});
          SELECT e.chains INTO chain_count FROM log_epochs e ORDER BY e.epoch DESC LIMIT 1;
          chain_count := coalesce(chain_count, 1);
          IF chain_count = 1 THEN
            wanted := '{{0}}';
          ELSE
            SELECT coalesce(array_agg(DISTINCT (s.value::bigint % chain_count)::integer), '{{}}') INTO wanted
              FROM jsonb_array_elements_text(coalesce(p->'slots', '[]'::jsonb)) s;
          END IF;
          head_chains := '{{}}';
          head_positions := '{{}}';
          head_hashes := '{{}}';
          IF 0 = ANY(wanted) THEN
            SELECT ARRAY[0], ARRAY[h.position], ARRAY[h.hash] INTO head_chains, head_positions, head_hashes
              FROM log_head h FOR UPDATE;
          END IF;
          IF chain_count > 1 THEN
            SELECT head_chains || coalesce(array_agg(x.chain ORDER BY x.chain), '{{}}'),
                   head_positions || coalesce(array_agg(x.position ORDER BY x.chain), '{{}}'),
                   head_hashes || coalesce(array_agg(x.hash ORDER BY x.chain), '{{}}')
              INTO head_chains, head_positions, head_hashes
              FROM (SELECT l.chain, l.position, l.hash FROM log_heads l
                    WHERE l.chain = ANY(wanted) ORDER BY l.chain FOR UPDATE) x;
          END IF;
          {SHARED_TAIL}
        END $$;
        GRANT EXECUTE ON FUNCTION subledger_ingest_begin(jsonb) TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    op.execute(
        f"""
        DROP FUNCTION subledger_ingest_begin(jsonb);
        CREATE FUNCTION subledger_ingest_begin(
          p jsonb, OUT head_position bigint, OUT head_hash bytea, OUT seen text[], OUT states jsonb, OUT links jsonb)
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
          SELECT h.position, h.hash INTO head_position, head_hash FROM log_head h FOR UPDATE;
          {SHARED_TAIL}
        END $$;
        GRANT EXECUTE ON FUNCTION subledger_ingest_begin(jsonb) TO {APP_ROLE};
        DROP TABLE log_epochs, log_heads;
        """
    )
