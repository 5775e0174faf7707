"""The ledger: append-only hash-chained event log, projections, transitions, outbox.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

APP_ROLE = "subledger_app"


def upgrade() -> None:
    op.execute(
        f"""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
            CREATE ROLE {APP_ROLE} NOLOGIN;
          END IF;
        EXCEPTION WHEN duplicate_object THEN NULL;
        END $$;
        """
    )
    # One row holds the chain's head. Appenders lock it, so positions are gapless and
    # commit-ordered, and each hash can cover the one before it.
    op.execute(
        """
        CREATE TABLE log_head (
          singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
          position bigint NOT NULL,
          hash bytea NOT NULL
        );
        INSERT INTO log_head (singleton, position, hash) VALUES (true, 0, decode(repeat('00', 32), 'hex'));

        CREATE TABLE event_log (
          position bigint PRIMARY KEY,
          source text NOT NULL,
          external_id text NOT NULL,
          app_id text NOT NULL,
          kind text NOT NULL,
          subscription_key text,
          app_user_id text,
          environment text,
          occurred_at timestamptz,
          received_at timestamptz NOT NULL,
          historical boolean NOT NULL DEFAULT false,
          raw bytea NOT NULL,
          facts jsonb NOT NULL,
          hash bytea NOT NULL,
          CONSTRAINT event_log_source_external_id UNIQUE (source, external_id)
        );
        CREATE INDEX event_log_subscription ON event_log (subscription_key, occurred_at);
        CREATE INDEX event_log_app_user ON event_log (app_user_id) WHERE app_user_id IS NOT NULL;
        CREATE INDEX event_log_received ON event_log (received_at);

        CREATE FUNCTION subledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION '% on % refused: the event log is append-only', TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
        END $$;
        CREATE TRIGGER event_log_append_only BEFORE UPDATE OR DELETE ON event_log
          FOR EACH ROW EXECUTE FUNCTION subledger_refuse_change();
        -- TRUNCATE fires no row trigger; it needs its own statement trigger.
        CREATE TRIGGER event_log_no_truncate BEFORE TRUNCATE ON event_log
          FOR EACH STATEMENT EXECUTE FUNCTION subledger_refuse_change();

        CREATE TABLE duplicate_receipts (
          source text NOT NULL,
          external_id text NOT NULL,
          received_at timestamptz NOT NULL
        );
        CREATE INDEX duplicate_receipts_key ON duplicate_receipts (source, external_id);

        CREATE TABLE subscriptions (
          key text PRIMARY KEY,
          app_id text NOT NULL,
          app_user_id text,
          status text,
          expires_at timestamptz,
          state jsonb NOT NULL,
          last_position bigint NOT NULL,
          updated_at timestamptz NOT NULL
        );
        CREATE INDEX subscriptions_app_user ON subscriptions (app_user_id);
        CREATE INDEX subscriptions_due ON subscriptions (expires_at)
          WHERE status IS NOT NULL AND status NOT IN ('expired', 'expired_promotional', 'paused');

        CREATE TABLE transitions (
          id text PRIMARY KEY,
          subscription_key text NOT NULL,
          kind text NOT NULL,
          app_id text NOT NULL,
          subscriber text NOT NULL,
          occurred_at timestamptz NOT NULL,
          log_position bigint NOT NULL,
          historical boolean NOT NULL,
          superseded_at timestamptz,
          created_at timestamptz NOT NULL,
          body jsonb NOT NULL
        );
        CREATE INDEX transitions_subscription ON transitions (subscription_key);
        CREATE INDEX transitions_subscriber ON transitions (subscriber);
        CREATE INDEX transitions_created ON transitions (created_at);

        CREATE TABLE outbox (
          id bigserial PRIMARY KEY,
          message_id text NOT NULL UNIQUE,
          transition_id text NOT NULL,
          destination text NOT NULL,
          app_id text NOT NULL,
          subscriber text NOT NULL,
          body jsonb NOT NULL,
          status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'dead')),
          attempts integer NOT NULL DEFAULT 0,
          available_at timestamptz NOT NULL,
          lease_until timestamptz,
          lease_owner text,
          first_attempt_at timestamptz,
          last_attempt_at timestamptz,
          last_status integer,
          last_error text,
          created_at timestamptz NOT NULL
        );
        CREATE INDEX outbox_due ON outbox (available_at, id) WHERE status = 'pending';
        CREATE INDEX outbox_subscriber_order ON outbox (app_id, destination, subscriber, id)
          WHERE status = 'pending';
        CREATE INDEX outbox_transition ON outbox (transition_id);
        ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.05);

        CREATE TABLE outbox_delivered (
          message_id text PRIMARY KEY,
          transition_id text NOT NULL,
          destination text NOT NULL,
          app_id text NOT NULL,
          subscriber text NOT NULL,
          body jsonb NOT NULL,
          attempts integer NOT NULL,
          created_at timestamptz NOT NULL,
          first_attempt_at timestamptz,
          delivered_at timestamptz NOT NULL,
          status_code integer
        );
        CREATE INDEX outbox_delivered_transition ON outbox_delivered (transition_id);
        CREATE INDEX outbox_delivered_at ON outbox_delivered (delivered_at);

        CREATE TABLE outbox_attempts (
          id bigserial PRIMARY KEY,
          message_id text NOT NULL,
          attempted_at timestamptz NOT NULL,
          status_code integer,
          outcome text NOT NULL,
          response text
        );
        CREATE INDEX outbox_attempts_message ON outbox_attempts (message_id);

        CREATE TABLE destination_state (
          app_id text NOT NULL,
          destination text NOT NULL,
          paused boolean NOT NULL DEFAULT false,
          paused_reason text,
          paused_at timestamptz,
          retry_after timestamptz,
          PRIMARY KEY (app_id, destination)
        );

        CREATE TABLE identity_links (
          app_id text NOT NULL,
          store_subscription text NOT NULL,
          app_user_id text NOT NULL,
          linked_at timestamptz NOT NULL,
          PRIMARY KEY (app_id, store_subscription)
        );
        """
    )
    op.execute(
        f"""
        GRANT SELECT, INSERT ON event_log, duplicate_receipts TO {APP_ROLE};
        GRANT SELECT, UPDATE ON log_head TO {APP_ROLE};
        GRANT SELECT, INSERT, UPDATE, DELETE ON subscriptions, transitions, outbox, outbox_delivered,
          outbox_attempts, destination_state, identity_links TO {APP_ROLE};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {APP_ROLE};
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE identity_links, destination_state, outbox_attempts, outbox_delivered, outbox,
          transitions, subscriptions, duplicate_receipts, event_log, log_head;
        DROP FUNCTION subledger_refuse_change();
        """
    )
