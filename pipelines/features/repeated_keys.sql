-- repeated_keys: the (operator_id, event_id) keys delivered more than once, with their
-- number of deliveries. Computed once and kept (a table; retries are a few per cent).
--
-- Input: `events`, rows with the columns of pos_events (all of bronze for the silver
-- table; for point-in-time features, only the rows known at the knowledge time).
--
-- Why not a window over every event: most events arrive once, and a window partitioned
-- by event id sorts all of bronze into millions of one-row partitions (it was most of
-- the features job's time). A hash aggregate finds the few repeated keys instead, and
-- repeated.sql ranks only their deliveries.
SELECT operator_id, event_id, count(*) AS deliveries
FROM events
GROUP BY operator_id, event_id
HAVING count(*) > 1
